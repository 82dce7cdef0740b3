"""A NumPy model of the CUDA warp kernel's selection (csrc/cuda/mask_warp.cu): trip counts and an instruction budget.

The kernel's steps, one (row, vector) at a time, on the int32 bits of the float32 scores: block maxima
of 8 columns; a bisection until k to CAP block maxima reach the bound; the list; a bisection to the
k-th largest listed block maximum; the smallest scores dropped until k remain. This model runs the
same steps in NumPy (tests/test_model_mask_warp.py checks its masks against the reference) and counts
how often each loop runs on the benchmark data (``benchmarks/_masks.py``: N(0, 0.02) fp16 weights,
log-normal statistics), then weighs the counts with the warp-instruction cost of each step, read from
the kernel's sm_90 SASS (nvcc 13.0, f16 weights, commit 1cceae4; ``--costs`` prints them):

    python benchmarks/model_mask_warp.py [--vectors 3] [--heavy] [--warm] [--bounds]

No GPU needed. The estimate is warp-instructions per SD1.5 vector, against the issue rate of an
H100/H200 (132 SMs x 4 schedulers x 1.98 GHz); the measured time then gives the issue efficiency.
``--bounds`` runs the bound path of batched calls instead (select_row_bounds: pair-maxima bounds,
window search, verification) and counts its probes, listed blocks and loose problems.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

CAP = 128

# Warp-instructions per step of mask_warp_kernel<__half, NC, false>: the lengths of its sm_90 SASS
# regions (nvcc 13.0, commit 1cceae4; loop bodies between a backward branch and its target, straight
# regions between REDUX instructions), by chunk count NC: pass 1 (all chunks, up to the top's
# REDUX.MAX), the setup up to the register bisection (the first counts; it includes the rarely taken
# recount from 0), one register bisection step; NC-independent: the list (fixed part + one ffs-loop
# trip per hit of the busiest lane), one 32-slot gather group, one list bisection step, the raise +
# first score count, one drop iteration, one null/OR group. Static lengths: an approximation of what
# runs (a few predicated-off instructions are counted).
PASS1 = {5: 159, 10: 327, 20: 661, 32: 1084}
SETUP = {5: 79, 10: 112, 20: 167, 32: 232}
REG_STEP = {5: 31, 10: 46, 20: 76, 32: 112}
LIST_FIXED, LIST_PER_HIT = 70, 9
GATHER_GROUP = 53
LIST_STEP = 28
RAISE_AND_COUNT = 115
DROP = 186
NULL_GROUP = 80


WARM_DROP = 1 << 21  # kWarmDrop: the warm start's first probe, this many bits below the guess


@dataclass
class Trips:
    reg_steps: int
    listed: int
    list_steps: int
    drops: int
    busiest_lane: int
    exact: bool
    guess: int = -1  # the k-th largest listed block maximum: the next problem's warm start
    loose: bool = False  # the bound path's bounds did not show k scores (select_row_bounds)


def chunks_for(d_in: int) -> int:
    need = -(-d_in // 256)
    return next(nc for nc in (5, 10, 20, 32) if need <= nc)


def select_row(bits: np.ndarray, k: int, cap: int = CAP, guess: int = -1) -> tuple[np.ndarray | None, Trips]:
    """The kernel's fast path on one row's score bits (int32, d_in a multiple of 8): the columns of
    the top k (None where the kernel takes its exact path) and the loop trip counts. ``guess``: the
    warm start (the previous problem's ``Trips.guess``; -1: none)."""
    nb = bits.size // 8
    nc = chunks_for(bits.size)
    blocks = bits.reshape(nb, 8)
    bm = np.full(nc * 32, -1, np.int64)
    bm[:nb] = blocks.max(axis=1)
    top = int(bm.max())
    count = lambda t: int((bm >= t).sum())  # noqa: E731
    hi = top + 1
    reg_steps = 0
    started = False
    if guess >= 0:
        t = max(guess - WARM_DROP, 0)
        c = count(t) if t < hi else 0
        if c >= k:
            lo, c_lo, started = t, c, True
        elif t < hi:
            hi = t
    if not started:
        if guess >= 0:
            reg_steps += 1  # the count at the guess was one step more
        lo = max(hi - 1 - (8 << 23), 0)
        c_lo = count(lo)
        if c_lo < k:
            hi, lo = max(lo, 1), 0
            c_lo = count(0)
    while c_lo >= k and c_lo > cap and hi - lo > 1:
        mid = lo + (hi - lo) // 2
        c = count(mid)
        reg_steps += 1
        if c >= k:
            lo, c_lo = mid, c
        else:
            hi = mid
    if c_lo < k or c_lo > cap:
        return None, Trips(reg_steps, 0, 0, 0, 0, True, guess)
    return _select_listed(blocks, bm, lo, hi, c_lo, k, reg_steps, verify=False)


def _select_listed(blocks: np.ndarray, key: np.ndarray, lo: int, hi: int, c_lo: int, k: int, reg_steps: int,
                   verify: bool) -> tuple[np.ndarray | None, Trips]:
    """Steps 3-5 (the kernel's select_listed) for the blocks whose key (block maxima, or with
    ``verify`` upper bounds of them) reaches lo. With ``verify``, fewer than k listed blocks with an
    exact maximum >= lo is a loose bound: (None, trips with ``loose`` set)."""
    listed = np.nonzero(key >= lo)[0]
    busiest = int(np.bincount(listed % 32, minlength=32).max())
    sc = blocks[listed]
    bmx = sc.max(axis=1)
    if verify:
        c_lo = int((bmx >= lo).sum())
        if c_lo < k:
            return None, Trips(reg_steps, len(listed), 0, 0, busiest, False, loose=True)
        hi = int(bmx.max()) + 1
    list_steps = 0
    while c_lo > k and hi - lo > 1:
        mid = lo + (hi - lo) // 2
        c = int((bmx >= mid).sum())
        list_steps += 1
        if c >= k:
            lo, c_lo = mid, c
        else:
            hi = mid
    if c_lo == k:
        lo = int(bmx[bmx >= lo].min())
    new_guess = lo
    c_s = int((sc >= lo).sum())
    drops = 0
    while c_s > k:
        low = int(sc[sc >= lo].min())
        n_low = int((sc == low).sum())
        drops += 1
        if c_s - n_low < k:  # equal scores straddle the k-th place: the exact path
            return None, Trips(reg_steps, len(listed), list_steps, drops, busiest, True, new_guess)
        lo, c_s = low + 1, c_s - n_low
    cols = (listed[:, None] * 8 + np.arange(8)[None, :])[sc >= lo]
    return np.sort(cols), Trips(reg_steps, len(listed), list_steps, drops, busiest, False, new_guess)


WINDOW_STEP = 1 << 19  # kWindowStep: the bound path's gallop step (1/16 octave)


def pair_bounds(abs_w: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """The bound path's block bounds (int32 bits, -1 at least): per column pair, fl(max |w| x max n)
    (non-finite -> NaN), the largest of a block's 4, as mask_bound_kernel computes them."""
    def pair_max(x: np.ndarray) -> np.ndarray:
        m = x.reshape(-1, 2).max(axis=1)  # NaN propagates
        return np.where(np.isfinite(x.reshape(-1, 2)).all(axis=1), m, np.float32(np.nan)).astype(np.float32)

    prod = (pair_max(abs_w.astype(np.float32)) * pair_max(np.abs(norms).astype(np.float32))).astype(np.float32)
    bits = prod.view(np.int32).copy()
    bits[np.isnan(prod)] = 0x7FFFFFFF  # the GPU's canonical NaN
    return np.maximum(bits.reshape(-1, 4).max(axis=1), -1)


def select_row_bounds(abs_w: np.ndarray, norms: np.ndarray, k: int, cap: int = CAP,
                      wguess: int = -1) -> tuple[np.ndarray | None, Trips]:
    """The bound path (solve_problem_bounds) on one row: |W| and the norms as float32. The window
    search's probes go to ``Trips.reg_steps``; ``Trips.guess`` is the window bound (the next vector's
    ``wguess``). ``loose``: the kernel would run select_row's path instead (None returned)."""
    scores = (abs_w.astype(np.float32) * norms.astype(np.float32)).astype(np.float32)
    blocks = scores.view(np.int32).reshape(-1, 8)
    ub = pair_bounds(abs_w, norms)
    count = lambda t: int((ub >= t).sum())  # noqa: E731
    top = int(ub.max())
    n_low = min(3 * k, cap - 24)
    steps, lo, found = 0, 0, False
    if top >= 0:
        a, b, a_high = 0, top + 1, False
        t = min(wguess, top) if wguess >= 0 else max(top - (8 << 23), 0)
        step, side = (WINDOW_STEP if wguess >= 0 else 0), 0
        while True:
            c = count(t)
            steps += 1
            if c > cap:
                a, a_high, direction = t, True, 1
            elif c >= n_low or t == 0:
                lo, n_listed, found = t, c, True
                break
            else:
                b, direction = t, -1
            if b - a <= 1:
                if a_high:
                    break
                t = 0
                continue
            if step and side in (0, direction):
                side, nxt = direction, t + direction * step
                step = step * 2 if step < (1 << 29) else step
                if a < nxt < b:
                    t = nxt
                    continue
            step = 0
            t = a + (b - a) // 2
    if not found or n_listed < k:
        return None, Trips(steps, 0, 0, 0, 0, False, loose=True)
    cols, trips = _select_listed(blocks, ub, lo, 0, n_listed, k, steps, verify=True)
    trips.guess = lo
    return cols, trips


def instructions(d_in: int, t: Trips) -> float:
    """Warp-instructions of one (row, vector) on the fast path, from the step costs above."""
    nc = chunks_for(d_in)
    groups = -(-t.listed // 32)
    return (PASS1[nc] + SETUP[nc] + REG_STEP[nc] * t.reg_steps + LIST_FIXED + LIST_PER_HIT * t.busiest_lane
            + GATHER_GROUP * groups + LIST_STEP * t.list_steps + RAISE_AND_COUNT + DROP * t.drops
            + NULL_GROUP * groups)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=3, help="statistics vectors per layer shape")
    parser.add_argument("--heavy", action="store_true", help="0.5 %% of columns with 100x statistics")
    parser.add_argument("--costs", action="store_true", help="print the per-step costs and exit")
    parser.add_argument("--warm", action="store_true", help="warm start from the row's previous vector")
    parser.add_argument("--bounds", action="store_true",
                        help="the bound path of batched calls: window probes, listed blocks, loose problems")
    args = parser.parse_args()
    if args.costs:
        for name in ("PASS1", "SETUP", "REG_STEP", "LIST_FIXED", "LIST_PER_HIT", "GATHER_GROUP", "LIST_STEP",
                     "RAISE_AND_COUNT", "DROP", "NULL_GROUP"):
            print(f"{name:<16} {globals()[name]}")
        return 0
    import torch

    from benchmarks._masks import SD15, layer_stats

    shapes = sorted(set(SD15))
    weights, sumsqs, _ = layer_stats(shapes, (args.vectors,), heavy=args.heavy, device="cpu")
    if args.bounds:
        return _bounds_report(shapes, weights, sumsqs, args.vectors)
    total = 0.0
    print(f"{'d_in':>6} {'k':>3} {'reg steps':>9} {'listed':>7} {'list steps':>10} {'drops':>6} {'exact':>6} "
          f"{'instr/problem':>13}")
    for (d_out, d_in), w, s in zip(shapes, weights, sumsqs):
        k = max(1, int(0.01 * d_in))
        aw = w.float().abs().numpy()
        trips, instr = [], []
        scores = [(aw * torch.sqrt(s[v]).numpy()[None, :]).astype(np.float32).view(np.int32)
                  for v in range(args.vectors)]
        for r in range(d_out):
            guess = -1  # a warp walks the vectors of its row in order
            for v in range(args.vectors):
                _, t = select_row(scores[v][r], k, guess=guess if args.warm else -1)
                guess = t.guess
                if args.warm and v == 0 and args.vectors > 1:
                    continue  # batched: the first vector of a row is the only cold one
                trips.append(t)
                instr.append(instructions(d_in, t))
        per_problem = float(np.mean(instr))
        total += per_problem * d_out * SD15.count((d_out, d_in))
        mean = lambda f, ts=trips: float(np.mean([f(t) for t in ts]))  # noqa: E731
        print(f"{d_in:>6} {k:>3} {mean(lambda t: t.reg_steps):>9.2f} {mean(lambda t: t.listed):>7.1f} "
              f"{mean(lambda t: t.list_steps):>10.2f} {mean(lambda t: t.drops):>6.2f} "
              f"{sum(t.exact for t in trips):>6} {per_problem:>13.0f}")
    rate = 132 * 4 * 1.98e9
    print(f"\nSD1.5, one vector: {total / 1e6:.1f} M warp-instructions = {total / rate * 1e6:.1f} us at the full "
          f"issue rate of 132 SMs x 4 x 1.98 GHz (H100 measured 33.0 us per vector batched, tenth session: "
          f"{total / rate * 1e6 / 33.0 * 100:.0f} % issue efficiency)")
    return 0


def _bounds_report(shapes, weights, sumsqs, vectors: int) -> int:
    """Per SD1.5 shape: the bound path's window probes and listed blocks per problem, and how many
    problems it hands to the block-maxima path (the kernel's loose_bound_counter)."""
    import torch

    print(f"{'d_in':>6} {'k':>3} {'window probes':>13} {'listed':>7} {'list steps':>10} {'loose':>6} {'problems':>8}")
    for (d_out, d_in), w, s in zip(shapes, weights, sumsqs):
        k = max(1, int(0.01 * d_in))
        aw = w.float().abs().numpy()
        norms = [torch.sqrt(s[v]).numpy() for v in range(vectors)]
        trips = []
        for r in range(d_out):
            wguess = -1
            for v in range(vectors):
                _, t = select_row_bounds(aw[r], norms[v], k, wguess=wguess)
                if not t.loose:
                    wguess = t.guess
                trips.append(t)
        ok = [t for t in trips if not t.loose] or trips
        mean = lambda f, ts=ok: float(np.mean([f(t) for t in ts]))  # noqa: E731
        print(f"{d_in:>6} {k:>3} {mean(lambda t: t.reg_steps):>13.2f} {mean(lambda t: t.listed):>7.1f} "
              f"{mean(lambda t: t.list_steps):>10.2f} {sum(t.loose for t in trips):>6} {len(trips):>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
