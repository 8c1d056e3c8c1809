//! The metrics acme records, through the [`metrics`] facade.
//!
//! acme records into whatever recorder the embedding program installed (none: recording costs
//! next to nothing). The `serve` program installs a Prometheus recorder and exposes these at
//! `GET /metrics`. Every name starts with `acme_`; the labels are listed per metric.
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | [`CHANGES_CAPTURED`] | counter | `table`, `op` | change rows committed to the raw layer (`op="snapshot"` for the initial copy) |
//! | [`COMMIT_ROUNDS`] | counter | | commit rounds of the change stream that committed rows |
//! | [`COMMIT_ROUND_SECONDS`] | histogram | | wall time of a commit round |
//! | [`COMPACTIONS`] | counter | `layer` | merges of small files committed |
//! | [`MODEL_STEPS`] | counter | `step` | model builds (`step="build"`) and warehouse refreshes (`step="refresh"`) |
//! | [`MODEL_STEP_SECONDS`] | histogram | `step` | wall time of a model step |
//! | [`LAG_BYTES`] | gauge | `layer` | WAL bytes the `raw` layer and the stored `model` trail the source by |
//! | [`LAG_SECONDS`] | gauge | `layer` | age of the oldest source commit the layer does not hold yet |
//! | [`RETRIES`] | counter | `task` | transient failures retried (`capture`, `model`, `refresh`) |
//! | [`RECONNECTS`] | counter | | reconnects to the source after a failure |
//! | [`ERRORS`] | counter | `task`, `kind`, `severity` | errors seen, retried or not |
//! | [`LAYER_FILES`] | gauge | `layer` | data files the published warehouse reads per layer |
//! | [`LAYER_BYTES`] | gauge | `layer` | bytes of those files |

/// Counter: change rows committed to the raw layer, by `table` and `op`.
pub const CHANGES_CAPTURED: &str = "acme_changes_captured_total";
/// Counter: commit rounds of the change stream that committed rows.
pub const COMMIT_ROUNDS: &str = "acme_commit_rounds_total";
/// Histogram: seconds per commit round.
pub const COMMIT_ROUND_SECONDS: &str = "acme_commit_round_seconds";
/// Counter: compactions committed, by `layer`.
pub const COMPACTIONS: &str = "acme_compactions_total";
/// Counter: model steps, by `step` (`build`, `refresh`).
pub const MODEL_STEPS: &str = "acme_model_steps_total";
/// Histogram: seconds per model step, by `step`.
pub const MODEL_STEP_SECONDS: &str = "acme_model_step_seconds";
/// Gauge: WAL bytes a layer trails the source by, by `layer` (`raw`, `model`).
pub const LAG_BYTES: &str = "acme_lag_bytes";
/// Gauge: seconds a layer trails the source by, by `layer` (`raw`, `model`).
pub const LAG_SECONDS: &str = "acme_lag_seconds";
/// Counter: transient failures retried, by `task`.
pub const RETRIES: &str = "acme_retries_total";
/// Counter: reconnects to the source.
pub const RECONNECTS: &str = "acme_reconnects_total";
/// Counter: errors, by `task`, `kind` and `severity`.
pub const ERRORS: &str = "acme_errors_total";
/// Gauge: data files per layer in the published warehouse, by `layer`.
pub const LAYER_FILES: &str = "acme_layer_files";
/// Gauge: bytes of the data files per layer in the published warehouse, by `layer`.
pub const LAYER_BYTES: &str = "acme_layer_bytes";

/// Give every acme metric its unit and help text in the installed recorder. Call it once after
/// installing a recorder (exporters print the help text, for example Prometheus's `# HELP`).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        CHANGES_CAPTURED,
        Unit::Count,
        "Change rows committed to the raw layer, by source table and operation"
    );
    describe_counter!(COMMIT_ROUNDS, Unit::Count, "Commit rounds of the change stream that committed rows");
    describe_histogram!(COMMIT_ROUND_SECONDS, Unit::Seconds, "Wall time of a commit round of the change stream");
    describe_counter!(COMPACTIONS, Unit::Count, "Merges of small files committed, by layer");
    describe_counter!(MODEL_STEPS, Unit::Count, "Model builds (step=build) and warehouse refreshes (step=refresh)");
    describe_histogram!(MODEL_STEP_SECONDS, Unit::Seconds, "Wall time of a model step, by step");
    describe_gauge!(LAG_BYTES, Unit::Bytes, "WAL bytes the raw layer and the stored model trail the source by");
    describe_gauge!(LAG_SECONDS, Unit::Seconds, "Age of the oldest source commit a layer does not hold yet");
    describe_counter!(RETRIES, Unit::Count, "Transient failures retried, by task");
    describe_counter!(RECONNECTS, Unit::Count, "Reconnects to the source after a failure");
    describe_counter!(ERRORS, Unit::Count, "Errors seen, retried or not, by task, kind and severity");
    describe_gauge!(LAYER_FILES, Unit::Count, "Data files the published warehouse reads, by layer");
    describe_gauge!(LAYER_BYTES, Unit::Bytes, "Bytes of the data files the published warehouse reads, by layer");
}

/// A short, stable name for an error's kind, for the `kind` label of [`ERRORS`]: the chain of
/// enum variant names its `Debug` form starts with, for example `Ingest/Connect` or
/// `Model/Core/Delta`. The payloads (messages, URLs) are left out, so the label's values stay few.
pub fn error_kind(error: &dyn std::fmt::Debug) -> String {
    let debug = format!("{error:?}");
    let mut kind = String::new();
    let mut rest = debug.as_str();
    loop {
        let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
        let (name, after) = rest.split_at(end);
        if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_uppercase()) {
            break;
        }
        if !kind.is_empty() {
            kind.push('/');
        }
        kind.push_str(name);
        match after.strip_prefix('(') {
            Some(inner) => rest = inner,
            None => break,
        }
    }
    if kind.is_empty() { "Unknown".into() } else { kind }
}

#[cfg(test)]
mod tests {
    use super::error_kind;

    #[derive(Debug)]
    #[allow(dead_code)]
    enum Inner {
        Connect { url: String },
        Message(String),
    }

    #[derive(Debug)]
    #[allow(dead_code)]
    enum Outer {
        Ingest(Inner),
        Plain,
    }

    #[test]
    fn error_kinds_name_the_variants_and_leave_out_the_payloads() {
        assert_eq!(error_kind(&Outer::Ingest(Inner::Connect { url: "postgres://secret@h".into() })), "Ingest/Connect");
        assert_eq!(error_kind(&Outer::Ingest(Inner::Message("Upper case text".into()))), "Ingest/Message");
        assert_eq!(error_kind(&Outer::Plain), "Plain");
        assert_eq!(error_kind(&"a string"), "Unknown");
    }
}
