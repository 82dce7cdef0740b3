"""Draw PNG plots from the CSV that bench_gpu_ops.py writes: one bar chart per op.

Usage: python benchmarks/plot_gpu_ops.py [gpu_ops.csv] [--out DIR]
(default CSV: $OUT/gpu_ops.csv, else ./bench_out/gpu_ops.csv; plots go beside it unless --out).
Bars are medians on a log scale with p20-p80 whiskers, grouped by shape, one colour per backend.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]


def load(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("median_us")]


def plot_op(op: str, rows: list[dict], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memloc.io import atomic_path

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    by_key = {(r["shape"], r["backend"]): r for r in rows}
    width = 0.8 / max(1, len(backends))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(shapes) * max(1, len(backends)) ** 0.5), 3.8))
    for j, backend in enumerate(backends):
        xs, med, lo, hi = [], [], [], []
        for i, shape in enumerate(shapes):
            r = by_key.get((shape, backend))
            if r is None:
                continue
            m, p20, p80 = float(r["median_us"]), float(r["p20_us"]), float(r["p80_us"])
            xs.append(i + (j - (len(backends) - 1) / 2) * width)
            med.append(m)
            lo.append(max(0.0, m - p20))
            hi.append(max(0.0, p80 - m))
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=backend)
        for x, m, r in zip(xs, med, [by_key[(s, backend)] for s in shapes if (s, backend) in by_key]):
            label = f"{m:.3g}" + (f"\n{r['gbps']} GB/s" if r.get("gbps") else "")
            ax.annotate(label, (x, m), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(shapes)), shapes, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median time (us)")
    gpu = rows[0].get("gpu", "")
    ax.set_title(f"{op} - {gpu}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / (re.sub(r"[^A-Za-z0-9_]+", "_", op).strip("_") + ".png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("OUT") or ROOT / "bench_out") / "gpu_ops.csv"
    parser.add_argument("csv", nargs="?", type=Path, default=default)
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: beside the CSV)")
    args = parser.parse_args(argv)
    if not args.csv.is_file():
        print(f"error: {args.csv} does not exist (run benchmarks/bench_gpu_ops.py first)", file=sys.stderr)
        return 2
    rows = load(args.csv)
    if not rows:
        print(f"error: {args.csv} has no timing rows", file=sys.stderr)
        return 2
    out_dir = args.out or args.csv.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["op"]].append(r)
    for op, op_rows in groups.items():
        print(plot_op(op, op_rows, out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
