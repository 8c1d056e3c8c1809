//! Removing what acme created in a source database, for a warehouse that is retired (or a
//! demo run against a user's database): the replication slot, which otherwise holds WAL on the
//! server for ever, the publication, and the trigger fallback's triggers, function and
//! changelog. The warehouse's files are not touched.
//!
//! What is acme's is told by name (the configured slot, and the changelog objects named after
//! it) and, for the publication, by the comment acme puts on the publications it creates: a
//! publication the user made (and configured acme to read) is left in place and reported.

use acme_core::AcmeConfig;

use crate::error::{IngestError, Result};
use crate::source::{SourceUrl, quote_ident};
use crate::triggers::Changelog;

/// How many times (every 100 ms) [`teardown`] looks again at a slot in use before saying so.
const SLOT_RELEASE_POLLS: u32 = 50;

/// What [`teardown`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Teardown {
    /// The objects removed, one description each (`replication slot acme_slot`, ...).
    pub removed: Vec<String>,
    /// Objects found and left in place, each with the reason.
    pub kept: Vec<String>,
}

/// The comment acme puts on a publication it creates for the warehouse streaming through
/// replication slot `slot`.
pub fn publication_mark(slot: &str) -> String {
    format!("created by acme for replication slot {slot}")
}

/// `text` as an SQL string literal.
pub(crate) fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Remove from the source of `config` every object acme created there for the warehouse whose
/// slot setting is `config.slot`: the replication slot, the publication `config.publication`
/// if acme created it, and the trigger fallback's triggers, function and changelog. Objects
/// that do not exist are skipped, so it can run again.
///
/// A slot that a running acme still streams from is not removed: the error names the server
/// process, to be stopped first.
///
/// ```no_run
/// # async fn demo(config: acme_core::AcmeConfig) -> acme_ingest::Result<()> {
/// let done = acme_ingest::teardown(&config).await?;
/// for object in &done.removed {
///     println!("removed {object}");
/// }
/// # Ok(())
/// # }
/// ```
pub async fn teardown(config: &AcmeConfig) -> Result<Teardown> {
    let url = config.source_url.as_deref().ok_or(IngestError::NoSource)?;
    let url = SourceUrl::parse(url)?.with_timeout(config.source_timeout);
    let client = url.connect().await?;
    let sql = |doing: &'static str| move |source| IngestError::Source { context: doing.to_string(), source };
    let mut done = Teardown::default();

    // A process that just stopped streaming leaves its server process for a moment: wait a
    // little for the slot to be released before calling it in use.
    let mut slot = None;
    for attempt in 0..=SLOT_RELEASE_POLLS {
        slot = client
            .query_opt("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&config.slot])
            .await
            .map_err(sql("looking for the replication slot"))?
            .map(|row| row.get::<_, Option<i32>>(0));
        if !matches!(slot, Some(Some(_))) || attempt == SLOT_RELEASE_POLLS {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    if let Some(active) = slot {
        if let Some(pid) = active {
            return Err(IngestError::SlotActive { slot: config.slot.clone(), pid });
        }
        // A process may take the slot between the look and the drop: the server then refuses
        // the drop as "object in use", which is the same answer as a slot found active.
        if let Err(error) = client.execute("SELECT pg_drop_replication_slot($1)", &[&config.slot]).await {
            if error.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) {
                let pid = client
                    .query_opt("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&config.slot])
                    .await
                    .map_err(sql("looking for the replication slot"))?
                    .and_then(|row| row.get::<_, Option<i32>>(0));
                if let Some(pid) = pid {
                    return Err(IngestError::SlotActive { slot: config.slot.clone(), pid });
                }
            }
            return Err(sql("removing the replication slot")(error));
        }
        done.removed.push(format!("replication slot {}", config.slot));
    }

    let publication = client
        .query_opt(
            "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = $1",
            &[&config.publication],
        )
        .await
        .map_err(sql("looking for the publication"))?;
    if let Some(row) = publication {
        let comment: Option<String> = row.get(0);
        if comment.as_deref() == Some(publication_mark(&config.slot).as_str()) {
            client
                .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(&config.publication)))
                .await
                .map_err(sql("removing the publication"))?;
            done.removed.push(format!("publication {}", config.publication));
        } else {
            done.kept.push(format!(
                "publication {} (acme did not create it for slot {}: drop it yourself if nothing else reads it)",
                config.publication, config.slot
            ));
        }
    }

    done.removed.extend(Changelog::new(&config.slot).remove(&client).await?);
    Ok(done)
}
