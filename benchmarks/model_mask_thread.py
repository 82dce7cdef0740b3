"""A NumPy model of the CUDA thread kernel's per-thread selection (csrc/cuda/mask_thread.cu): masks and trip counts.

One thread solves one (row, vector) problem on the int32 bits of the float32 scores: blocks of 8
columns scored in order, a block whose maximum reaches the threshold g appended to a 96-slot list
(raised and compacted when nearly full), beta = the k-th largest listed maximum, the blocks reaching
beta rescored into their scores >= beta, the smallest dropped until k remain. This model runs the
same steps (tests/test_model_mask_thread.py checks its masks against the reference, under warm
starts, scale jumps and ties) and reports how often a problem is left to the warp fallback and how
many raises and search steps it takes on the benchmark data:

    python benchmarks/model_mask_thread.py [--vectors 8] [--heavy]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

LIST = 96  # kListLen
GROUP = 8  # kGroup
RAISE_TO = LIST - 3 * GROUP  # kRaiseTo
DROP0, DROP_WIDE_K, DROP_MAX = 1 << 22, 1 << 21, 1 << 25  # kDrop0, kDropWideK, kDropMax
OCTAVES8 = 8 << 23


@dataclass
class Trip:
    failed: bool  # left to the warp fallback
    miss: bool  # ... because fewer than k blocks reached the warm threshold
    raises: int
    steps: int  # count scans over the list (raises and the beta search)
    listed: int  # list length after the pass
    drops: int
    guess: int  # the next problem's warm start
    drop: int  # the next problem's warm-start margin


def _bisect(vals: list[int], lo: int, hi: int, c_lo: int, k: int, stop: int) -> tuple[int, int, int, int]:
    steps = 0
    while c_lo > stop and hi - lo > 1:
        mid = lo + (hi - lo) // 2
        c = sum(v >= mid for v in vals)
        steps += 1
        if c >= k:
            lo, c_lo = mid, c
        else:
            hi = mid
    return lo, hi, c_lo, steps


def _split(vals: list[int], t: int, lo: int, hi: int, c_lo: int, k: int) -> tuple[int, int, int]:
    """One probe of the bracket [lo, hi) at t (lo < t < hi): lo = t when k values reach it, else hi = t."""
    c = sum(v >= t for v in vals)
    return (t, hi, c) if c >= k else (lo, t, c_lo)


def first_drop(k: int) -> int:
    """The warm-start margin a thread starts with."""
    return DROP_WIDE_K if k >= 32 else DROP0


def select_row(bits: np.ndarray, k: int, guess: int = -1, drop: int | None = None) -> tuple[np.ndarray | None, Trip]:
    """The thread kernel's path on one row's score bits (int32, d_in a multiple of 8): the columns of
    the top k, or None where the kernel leaves the problem to its warp fallback."""
    if drop is None:
        drop = first_drop(k)
    blocks = bits.reshape(-1, 8).astype(np.int64)
    bm = blocks.max(axis=1)
    g = max(guess - drop, 0) if guess >= 0 else 0
    vals: list[int] = []
    idx: list[int] = []
    failed = miss = False
    raises = steps = 0
    for b0 in range(0, len(bm), GROUP):
        if len(vals) > LIST - GROUP:
            if failed:
                vals, idx = [], []
            else:
                raises += 1
                hi = max(vals) + 1
                lo, c_lo = g, len(vals)
                deep = max(hi - 1 - OCTAVES8, 0)
                if deep > lo:
                    steps += 1
                    lo, hi, c_lo = _split(vals, deep, lo, hi, c_lo, k)
                lo, hi, c_lo, s = _bisect(vals, lo, hi, c_lo, k, RAISE_TO)
                steps += s
                if c_lo > LIST - 2 * GROUP:
                    failed, vals, idx = True, [], []
                else:
                    keep = [i for i, v in enumerate(vals) if v >= lo]
                    vals, idx, g = [vals[i] for i in keep], [idx[i] for i in keep], lo
        for b in range(b0, min(b0 + GROUP, len(bm))):
            if bm[b] >= g:
                vals.append(int(bm[b]))
                idx.append(b)
    listed = len(vals)
    if not failed and listed < k:
        failed = miss = True
        drop = min(drop * 2, DROP_MAX)
    if failed:
        return None, Trip(True, miss, raises, steps, listed, 0, guess, drop)
    lo, c_lo, hi = g, listed, max(vals) + 1
    if lo < guess < hi:
        steps += 1
        lo, hi, c_lo = _split(vals, guess, lo, hi, c_lo, k)
    lo, hi, c_lo, s = _bisect(vals, lo, hi, c_lo, k, k)
    steps += s
    beta = min(v for v in vals if v >= lo) if c_lo == k else lo
    # the blocks reaching beta, rescored: the first maximum in place, other scores >= beta appended
    ev, ec = [], []
    extra_v, extra_c = [], []
    for v, b in zip(vals, idx):
        if v < beta:
            continue
        first = True
        for e in range(8):
            s_ = int(blocks[b, e])
            if first and s_ == v:
                ev.append(v)
                ec.append(8 * b + e)
                first = False
            elif s_ >= beta:
                extra_v.append(s_)
                extra_c.append(8 * b + e)
    ev, ec = ev + extra_v, ec + extra_c
    if len(ev) > LIST:
        return None, Trip(True, False, raises, steps, listed, 0, beta, drop)
    c, lo, drops = len(ev), beta, 0
    while c > k:
        low = min(v for v in ev if v >= lo)
        n_low = sum(v == low for v in ev)
        drops += 1
        if c - n_low < k:  # equal scores straddle the k-th place
            return None, Trip(True, False, raises, steps, listed, drops, beta, drop)
        lo, c = low + 1, c - n_low
    cols = np.sort(np.array([col for v, col in zip(ev, ec) if v >= lo]))
    return cols, Trip(False, False, raises, steps, listed, drops, beta, drop)


def kth_block_max(bits: np.ndarray, k: int) -> int:
    """What the warp fallback leaves as the next guess: the k-th largest block maximum."""
    return int(np.sort(bits.reshape(-1, 8).max(axis=1))[-k])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=8, help="statistics vectors per layer shape")
    parser.add_argument("--rows", type=int, default=64, help="rows per layer shape")
    parser.add_argument("--heavy", action="store_true", help="0.5 %% of columns with 100x statistics")
    args = parser.parse_args()
    import torch

    from benchmarks._masks import SD15, layer_stats

    shapes = [(min(d_out, args.rows), d_in) for d_out, d_in in sorted(set(SD15))]
    weights, sumsqs, _ = layer_stats(shapes, (args.vectors,), heavy=args.heavy, device="cpu")
    print(f"{'d_in':>6} {'k':>3} {'left':>6} {'misses':>6} {'raises':>6} {'steps':>6} {'listed':>6} {'drops':>6}"
          "   (per warm problem: every thread's first vector is cold)")
    for (d_out, d_in), w, s in zip(shapes, weights, sumsqs):
        k = max(1, int(0.01 * d_in))
        aw = w.float().abs().numpy()
        trips = []
        for r in range(d_out):
            guess, drop = -1, first_drop(k)
            for v in range(args.vectors):
                bits = (aw[r] * torch.sqrt(s[v]).numpy()).astype(np.float32).view(np.int32)
                _, t = select_row(bits, k, guess, drop)
                guess, drop = (kth_block_max(bits, k) if t.failed else t.guess), t.drop
                if v:
                    trips.append(t)
        mean = lambda f, ts=trips: float(np.mean([f(t) for t in ts]))  # noqa: E731
        print(f"{d_in:>6} {k:>3} {mean(lambda t: t.failed):>6.3f} {mean(lambda t: t.miss):>6.3f} "
              f"{mean(lambda t: t.raises):>6.2f} {mean(lambda t: t.steps):>6.2f} {mean(lambda t: t.listed):>6.1f} "
              f"{mean(lambda t: t.drops):>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
