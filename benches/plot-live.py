"""Plot the live-report figures of the benchmarks (issue 16) into bench-live.png.

Reads what the benches wrote under bench-data/ (or $ACME_BENCH_DATA):
- sf<SF>-seed42/tail-summary.md (`ACME_BENCH_SF=<SF> ACME_BENCH_TAIL_ONLY=1 cargo bench --bench model`):
  report times with a raw tail of N changes, held in memory or applied per query, and without one;
- freshness-sf<SF>.md (`ACME_BENCH_SF=<SF> cargo bench --features http --bench freshness`):
  report and raw-layer freshness percentiles, and the duration of the last model build (fold).

Left: the time each report adds when it applies a tail, against the tail's size, per scale factor.
Right: freshness p50 and p99 (reports through the library, and the raw layer), per scale factor.

Run: /var/tmp/acme-venv/bin/python benches/plot-live.py (needs matplotlib).
"""

import os
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(os.environ.get("ACME_BENCH_DATA", Path(__file__).resolve().parent.parent / "bench-data"))
REPORTS = ["R1", "R2", "R3", "R4", "R1 as of", "R2 as of", "R3 as of", "R4 as of"]


def table_rows(text):
    """The rows of the markdown tables in `text`, as lists of cell strings."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def tails(sf):
    """{label: [ms per report]} from the tail summary of one scale factor, and the no-tail row."""
    path = ROOT / f"sf{sf}-seed42" / "tail-summary.md"
    if not path.exists():
        return None
    base, series = None, {}
    for cells in table_rows(path.read_text()):
        if len(cells) != 10 or not re.match(r"^[0-9.]+$", cells[2]):
            continue
        times = [float(c) for c in cells[2:]]
        if cells[0].startswith("none"):
            base = times
            continue
        m = re.match(r"(\d+) changes, (.*)", cells[0])
        # A dataset with fewer streamed changes than a wanted tail repeats its largest one.
        if m and int(m.group(1)) not in [n for n, _ in series.get(m.group(2), [])]:
            series.setdefault(m.group(2), []).append((int(m.group(1)), times))
    return base, series


def freshness(sf):
    path = ROOT / f"freshness-sf{sf}.md"
    if not path.exists():
        return None
    out = {}
    for cells in table_rows(path.read_text()):
        if len(cells) == 6 and cells[1].endswith("ms"):
            out[cells[0]] = [int(c.split()[0]) for c in cells[1:5]]
    return out


def main():
    scales = [s for s in ["0.1", "1", "10"] if (ROOT / f"sf{s}-seed42" / "tail-summary.md").exists()]
    if not scales:
        sys.exit(f"no tail summaries under {ROOT}")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for sf in scales:
        base, series = tails(sf)
        for how, points in sorted(series.items()):
            points.sort()
            xs = [n for n, _ in points]
            for report, style in [("R3", "-"), ("R3 as of", "--"), ("R1", ":")]:
                i = REPORTS.index(report)
                ys = [t[i] - base[i] for _, t in points]
                left.plot(xs, ys, style, marker="o", label=f"SF{sf} {report}, tail {how}")
    left.set_xscale("log")
    left.set_xlabel("raw changes after the stored model (tail)")
    left.set_ylabel("time the tail adds to the report (ms, median of 7)")
    left.set_title("Merge-on-read cost against tail size")
    left.axhline(0, color="grey", linewidth=0.5)
    left.legend(fontsize=7)

    labels, p50, p99, raw50 = [], [], [], []
    for sf in ["0.1", "1", "10"]:
        f = freshness(sf)
        if not f:
            continue
        lib = next((v for k, v in f.items() if "Pipeline" in k), None)
        raw = next((v for k, v in f.items() if "raw layer" in k), None)
        if lib and raw:
            labels.append(f"SF{sf}")
            p50.append(lib[0])
            p99.append(lib[2])
            raw50.append(raw[0])
    xs = range(len(labels))
    right.bar([x - 0.25 for x in xs], p50, width=0.25, label="reports p50")
    right.bar(list(xs), p99, width=0.25, label="reports p99")
    right.bar([x + 0.25 for x in xs], raw50, width=0.25, label="raw layer p50 (baseline)")
    right.axhline(500, color="green", linestyle="--", linewidth=1, label="target p50 0.5 s")
    right.axhline(2000, color="red", linestyle="--", linewidth=1, label="target p99 2 s")
    right.set_xticks(list(xs))
    right.set_xticklabels(labels)
    right.set_ylabel("commit until R1, R3 and R4 show it (ms)")
    right.set_title("Report freshness under the live workload")
    right.legend(fontsize=8)
    fig.tight_layout()
    out = Path(__file__).resolve().parent.parent / "bench-live.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
