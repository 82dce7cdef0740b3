"""Summarize an ncu source page (``--page source --csv --print-source sass``) by straight-line region.

Usage: python scripts/ncu_regions.py source.csv[.gz] [--min 0.4]
Consecutive SASS instructions with the same execution count form a region (a loop body or the
straight code between branches); each region's share of executed warp-instructions and of the
warp-stall samples is printed with its commonest opcodes, so that a kernel's time can be placed
in its phases without hardware counters per phase.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip


def regions(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = list(csv.reader(f))
    header = rows[1]
    col = {h: i for i, h in enumerate(header)}
    samples, executed = col["Warp Stall Sampling (All Samples)"], col["Instructions Executed"]
    out: list[dict] = []
    for n, r in enumerate(rows[2:]):
        text = r[col["Source"]].strip().split()
        op = (text[1] if text and text[0].startswith("@") else text[0] if text else "").split(".")[0]
        e, s = int(r[executed] or 0), int(r[samples] or 0)
        if out and out[-1]["executed"] == e:
            reg = out[-1]
            reg["end"], reg["length"], reg["samples"] = n, reg["length"] + 1, reg["samples"] + s
            reg["ops"][op] += 1
        else:
            out.append({"start": n, "end": n, "executed": e, "length": 1, "samples": s,
                        "ops": collections.Counter([op])})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("--min", type=float, default=0.4, help="hide regions under this %% of both")
    args = parser.parse_args()
    regs = regions(args.source)
    total_i = sum(r["executed"] * r["length"] for r in regs) or 1
    total_s = sum(r["samples"] for r in regs) or 1
    print(f"{total_i} warp-instructions executed, {total_s} stall samples")
    print(f"{'SASS lines':<13} {'runs':>9} {'length':>6} {'instr %':>7} {'stall %':>7}  commonest opcodes")
    for r in regs:
        pi, ps = 100 * r["executed"] * r["length"] / total_i, 100 * r["samples"] / total_s
        if max(pi, ps) >= args.min:
            ops = ", ".join(f"{k} {v}" for k, v in r["ops"].most_common(6))
            print(f"{r['start']:>6}-{r['end']:<6} {r['executed']:>9} {r['length']:>6} {pi:7.1f} {ps:7.1f}  {ops}")


if __name__ == "__main__":
    main()
