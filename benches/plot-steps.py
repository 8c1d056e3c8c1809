"""Plot the step-cost figures of `cargo bench --bench steps` into bench-steps.png.

Reads bench-data/steps.csv (or $ACME_BENCH_DATA/steps.csv): one row per timed step (scale
factor, step size, raw changes, tail, live step ms, first step after a fold ms, fold ms). Draws
the median time of a live step (the reports, histories and star schema brought to the new
position), of the first step after a fold, and of the fold of the same changes (the model
build), per step size, against the scale factor, both axes
logarithmic: a cost that follows the change stays flat as the table grows, one that follows
the table rises with it.

Run: /var/tmp/acme-venv/bin/python benches/plot-steps.py (needs matplotlib).
"""

import csv
import os
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

root = Path(os.environ.get("ACME_BENCH_DATA", Path(__file__).resolve().parent.parent / "bench-data"))
steps = defaultdict(lambda: {"live": [], "first": [], "fold": [], "changes": []})
with open(root / "steps.csv") as f:
    for row in csv.DictReader(f):
        key = (int(row["target"]), float(row["sf"]))
        steps[key]["live"].append(float(row["live_ms"]))
        steps[key]["fold"].append(float(row["fold_ms"]))
        steps[key]["first"].append(float(row["first_ms"]))
        steps[key]["changes"].append(int(row["changes"]))

fig, ax = plt.subplots(figsize=(8, 5))
for target, style in [(1000, "o"), (10000, "s")]:
    sfs = sorted(sf for (t, sf) in steps if t == target)
    if not sfs:
        continue
    names = {"live": "live step", "first": "first step after a fold", "fold": "fold (model build)"}
    for kind, colour in [("live", "tab:blue"), ("first", "tab:green"), ("fold", "tab:red")]:
        medians = [statistics.median(steps[(target, sf)][kind]) for sf in sfs]
        label = f"{names[kind]}, {target // 1000}k changes"
        ax.plot(sfs, medians, marker=style, color=colour, linestyle="-" if target == 1000 else "--", label=label)
        for sf, ms in zip(sfs, medians):
            ax.annotate(f"{ms:.0f}", (sf, ms), textcoords="offset points", xytext=(4, 4), fontsize=8)
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("scale factor (SF1: about 9.6M source rows)")
ax.set_ylabel("median step time (ms)")
ax.set_title("Cost of one step against table size (benches/steps.rs)")
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8)
out = Path(__file__).resolve().parent.parent / "bench-steps.png"
fig.tight_layout()
fig.savefig(out, dpi=110)
print(f"written to {out}")
