#!/usr/bin/env bash
# One command for the whole benchmark report: runs every benchmark at ACME_BENCH_SF (default 1)
# on this machine, then writes bench-report.md (and bench-latency.png) from their summaries.
# Every figure in the summaries is measured beside its baseline in the same run.
#
#   bash benches/report.sh            # SF1 (the bench dataset is generated once and cached)
#   ACME_BENCH_SF=0.1 bash benches/report.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export ACME_BENCH_SF="${ACME_BENCH_SF:-1}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/acme-target-bench}"
export CARGO_TERM_COLOR=never

# DuckDB (the reports baseline) in a local virtual environment, as .ci/run sets it up.
VENV="${ACME_VENV:-/var/tmp/acme-venv}"
if ! "$VENV/bin/python" -c "import duckdb" >/dev/null 2>&1; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check 'moto[server]>=5.2,<5.3' 'duckdb>=2.0,<2.1' 'pyarrow'
fi
export ACME_VENV="$VENV"

data="bench-data/sf${ACME_BENCH_SF}-seed42"
log="bench-data/report-run.log"
mkdir -p bench-data
# ACME_REPORT_ONLY=1 rewrites the report from the summaries of the last run.
if [ -z "${ACME_REPORT_ONLY:-}" ]; then
    : > "$log"
    for bench in snapshot reports model cdc freshness; do
        echo "== cargo bench --bench $bench (ACME_BENCH_SF=$ACME_BENCH_SF)" | tee -a "$log"
        cargo bench --features http --bench "$bench" >> "$log" 2>&1
    done
fi
python3 benches/latency_png.py bench-data/cdc-latencies.txt bench-latency.png
postgres=$(ls -d /usr/lib/postgresql/*/bin/postgres 2>/dev/null | head -1)

section() {
    if [ -f "$1" ]; then cat "$1"; else echo "(missing: $1; see $log)"; fi
    echo
}

{
    echo "# acme benchmark report"
    echo
    echo "Written by \`bash benches/report.sh\` (ACME_BENCH_SF=$ACME_BENCH_SF) on $(date -u +%Y-%m-%d)."
    echo "Every figure sits beside a baseline measured in the same run on the same machine, as a"
    echo "ratio. These machines are noisy: compare ratios, not absolute times."
    echo
    echo "**Machine:** $(nproc) vCPU ($(lscpu | sed -n 's/^Model name: *//p' | head -1)),"
    echo "$(free -g | awk '/^Mem:/ {print $2}') GiB RAM, $(uname -sr), $(rustc --version | cut -d' ' -f1-2),"
    echo "${postgres:+$("$postgres" --version)} test cluster"
    echo "(loopback, \`fsync=off\`, \`synchronous_commit=off\`, \`wal_writer_delay=10ms\`),"
    echo "DuckDB $("$VENV/bin/python" -c 'import duckdb; print(duckdb.__version__)')."
    echo
    echo "Targets (issue 7): snapshot <= 1.2x raw COPY; decoding >= 0.8x pg_recvlogical; each report"
    echo "<= 1.0x DuckDB; freshness p50 <= 0.5 s, p99 <= 2 s; snapshot peak RSS < 300 MB."
    echo
    section "$data/snapshot-summary.md"
    section "bench-data/cdc-summary.md"
    echo "Latency histogram (50 ms buckets; blue p50, orange p95, red p99; grid every 250 ms):"
    echo
    echo "![commit-to-queryable latency histogram](bench-latency.png)"
    echo
    echo "## Reports"
    section "$data/reports-summary.md"
    section "$data/model-summary.md"
    section "bench-data/freshness-sf${ACME_BENCH_SF}.md"
    if [ -f bench-data/sf10-summary.md ]; then
        section bench-data/sf10-summary.md
    elif [ ! -f bench-data/scale-summary.md ]; then
        echo "## SF10"
        echo
        echo "Not measured yet: no SF10 run has been made on this machine (\`bash benches/scale.sh\`)."
    fi
    # Memory against table size, SF1 and SF10, from `bash benches/scale.sh` (a separate, longer run).
    if [ -f bench-data/scale-summary.md ]; then
        section bench-data/scale-summary.md
    fi
    # Hand-written notes on earlier runs (what changed between them), kept under the figures.
    if [ -f benches/report-history.md ]; then
        section benches/report-history.md
    fi
} > bench-report.md
echo "wrote bench-report.md and bench-latency.png (benchmark output in $log)"
