"""Time SQL queries in DuckDB: the baseline of the reports benchmark.

Reads a JSON object on stdin: {"runs": N, "queries": {"name": "SQL", ...}}; prints a JSON
object {"version": DuckDB version, "median_ms": {"name": ms, ...}} with the median wall time
of N runs of each query after two warm-up runs (results fully fetched).
"""
import json
import statistics
import sys
import time

import duckdb


def main():
    spec = json.load(sys.stdin)
    con = duckdb.connect()
    out = {}
    for name, sql in spec["queries"].items():
        for _ in range(2):
            con.execute(sql).fetchall()
        times = []
        for _ in range(spec["runs"]):
            started = time.perf_counter()
            con.execute(sql).fetchall()
            times.append((time.perf_counter() - started) * 1000.0)
        out[name] = statistics.median(times)
    json.dump({"version": duckdb.__version__, "median_ms": out}, sys.stdout)


if __name__ == "__main__":
    main()
