#!/usr/bin/env bash
# Memory against table size: one uninterrupted `sync --once` (snapshot, then a full model build)
# into a new warehouse at each scale factor and model memory limit, each under /usr/bin/time -v,
# against a PostgreSQL cluster of its own with the generated ACME data (loaded once per scale
# factor and kept in bench-data/pg-sf<SF>). Writes bench-data/scale-summary.md, which
# benches/report.sh puts into bench-report.md.
#
#   bash benches/scale.sh                      # SF1 and SF10, limits 1024 and 256 MiB
#   ACME_SCALES="0.1 1" ACME_LIMITS_MIB="256" bash benches/scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/acme-target-bench}"
export CARGO_TERM_COLOR=never
scales="${ACME_SCALES:-1 10}"
limits="${ACME_LIMITS_MIB:-1024 256}"
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$bindir/postgres" ] || { echo "PostgreSQL server binaries not found under /usr/lib/postgresql" >&2; exit 1; }
mkdir -p bench-data
root="$(pwd)/bench-data"
cargo build --release --example load --example sync
bin="$CARGO_TARGET_DIR/release/examples"

as_pg() { if [ "$(id -u)" = "0" ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

port=55432
summary="$root/scale-summary.md"
{
    echo "## Memory against table size (\`bash benches/scale.sh\`)"
    echo
    echo "One uninterrupted \`sync --once\` (snapshot into a new warehouse, then a full model build),"
    echo "under \`/usr/bin/time -v\`, per scale factor and \`--memory-limit-mib\` (the model build's query-engine pool;"
    echo "sorts and aggregations spill beyond it). Source: PostgreSQL on the same 2 cores, no live workload."
    echo "\`sync\` runs on jemalloc (README, \"Memory\"); \"snapshot peak RSS\" is its high-water mark when the snapshot is done."
    echo
    echo "| scale | source rows | memory limit | snapshot | snapshot peak RSS | model build | whole run | peak RSS | peak RSS / limit |"
    echo "|---|---|---|---|---|---|---|---|---|"
} > "$summary"
for sf in $scales; do
    data="$root/pg-sf$sf"
    fresh=""
    if [ ! -f "$data/loaded" ]; then
        rm -rf "$data"; mkdir -p "$data"
        [ "$(id -u)" = "0" ] && chown postgres:postgres "$data"
        as_pg "$bindir/initdb" -D "$data/db" -U postgres -A trust -E UTF8 --locale=C --no-sync >/dev/null
        fresh=1
    fi
    as_pg "$bindir/pg_ctl" -D "$data/db" -l "$data/server.log" -w -o "-p $port -k /tmp -c listen_addresses=127.0.0.1 \
        -c wal_level=logical -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
        -c max_wal_size=8GB -c shared_buffers=1GB -c max_wal_senders=4 -c max_replication_slots=4" start >/dev/null
    trap 'as_pg "$bindir/pg_ctl" -D "$data/db" -m fast stop >/dev/null 2>&1 || true' EXIT
    url="postgres://postgres@127.0.0.1:$port/postgres"
    if [ -n "$fresh" ]; then
        echo "== loading SF$sf"
        "$bin/load" --target "$url" --scale "$sf" | tee "$data/load.txt"
        touch "$data/loaded"
    fi
    rows=$(as_pg "$bindir/psql" -h 127.0.0.1 -p $port -U postgres -At -c \
        "SELECT (SELECT count(*) FROM operations.customers) + (SELECT count(*) FROM operations.products) \
         + (SELECT count(*) FROM operations.orders) + (SELECT count(*) FROM operations.order_items)" postgres)
    for limit in $limits; do
        slot="acme_scale_${limit}"
        as_pg "$bindir/psql" -h 127.0.0.1 -p $port -U postgres -Atq -c \
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$slot'" postgres
        wh="$root/scale-warehouse"
        rm -rf "$wh"
        out="$root/scale-sf$sf-$limit.log"
        echo "== SF$sf, memory limit $limit MiB"
        if ! /usr/bin/time -v "$bin/sync" --source "$url" --warehouse "$wh" --once --slot "$slot" \
            --memory-limit-mib "$limit" > "$out" 2>&1; then
            # A failed run is a result too (e.g. a pool too small for the scale): its row says why.
            why=$(grep -a -m1 '^Error: ' "$out" | cut -c8- | cut -c1-120)
            echo "| SF$sf | $rows | $limit MiB | failed: ${why:-see $out} | | | | | |" >> "$summary"
            as_pg "$bindir/psql" -h 127.0.0.1 -p $port -U postgres -Atq -c \
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$slot'" postgres
            rm -rf "$wh"
            continue
        fi
        rss_kb=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$out")
        wall=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$out")
        snap=$(grep -ao 'ready after [^:]*' "$out" | head -1 | cut -d' ' -f3)
        model=$(grep -ao 'built in [0-9.]*[a-zµ]*' "$out" | head -1 | cut -d' ' -f3)
        # sync prints the process's high-water mark (VmHWM) when the snapshot is done.
        snap_rss=$(grep -ao 'ready after .*peak RSS so far [0-9]* MiB' "$out" | head -1 | sed 's/.*so far //')
        rss_mib=$((rss_kb / 1024))
        ratio=$(python3 -c "print(f'{$rss_mib / $limit:.2f}x')")
        echo "| SF$sf | $rows | $limit MiB | ${snap:-?} | ${snap_rss:-?} | ${model:-?} | $wall | $rss_mib MiB | $ratio |" >> "$summary"
        as_pg "$bindir/psql" -h 127.0.0.1 -p $port -U postgres -Atq -c "SELECT pg_drop_replication_slot('$slot')" postgres
        rm -rf "$wh"
    done
    as_pg "$bindir/pg_ctl" -D "$data/db" -m fast stop >/dev/null
    trap - EXIT
done
echo >> "$summary"
echo "wrote $summary"
