"""Answer and time SQL queries in DuckDB: the baseline of the reports benchmark.

Reads a JSON object on stdin:
  {"runs": N, "views": {"name": "SQL", ...}, "setup": ["SQL", ...], "queries": {"name": "SQL", ...}}
creates the views, runs the setup statements (precomputation, timed once), then for each query
fetches its rows once (for the benchmark's equality check) and times N runs after two warm-up
runs (results fully fetched). Prints a JSON object:
  {"version": DuckDB version, "threads": DuckDB's threads, "setup_ms": ms,
   "median_ms": {"name": ms, ...}, "rows": {"name": ["cell|cell|...", ...], ...}}
Rows are rendered as the benchmark renders acme's: cells joined by "|", NULL as "∅", dates
as YYYY-MM-DD.
"""
import datetime
import json
import statistics
import sys
import time

import duckdb

NULL = "\u2205"


def cell(value):
    if value is None:
        return NULL
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def main():
    spec = json.load(sys.stdin)
    con = duckdb.connect()
    for name, sql in spec.get("views", {}).items():
        con.execute(f"CREATE VIEW {name} AS {sql}")
    started = time.perf_counter()
    for sql in spec.get("setup", []):
        con.execute(sql)
    setup_ms = (time.perf_counter() - started) * 1000.0
    medians = {}
    rows = {}
    for name, sql in spec["queries"].items():
        rows[name] = ["|".join(cell(v) for v in row) for row in con.execute(sql).fetchall()]
        for _ in range(2):
            con.execute(sql).fetchall()
        times = []
        for _ in range(spec["runs"]):
            started = time.perf_counter()
            con.execute(sql).fetchall()
            times.append((time.perf_counter() - started) * 1000.0)
        medians[name] = statistics.median(times)
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    json.dump(
        {"version": duckdb.__version__, "threads": threads, "setup_ms": setup_ms, "median_ms": medians, "rows": rows},
        sys.stdout,
    )


if __name__ == "__main__":
    main()
