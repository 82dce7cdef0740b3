"""How many 8-column blocks an upper-bound prefilter would have to list: a model of an idea for the batched warp kernel.

The warp kernel's pass 1 computes every score's exact float32 product to get each 8-column block's
maximum (about 26 thread-instructions per block). A cheaper pass would score a block by an upper
bound, UB = max |W| over the block x max norm over the block (the |W| part per row once, the norm
part per vector once): every top-k score lies in a block with UB >= the k-th largest score s_k, so
the blocks with UB >= s_k would have to be listed and scored exactly. The kernel lists at most 128
blocks (4 per lane). This script counts, on the benchmark data (``benchmarks/_masks.py``: N(0, 0.02)
fp16 weights, log-normal statistics, optionally "heavy" columns), how many blocks reach s_k with the
exact block maximum (what the kernel lists now) and with the bound, for 8- and 4-column blocks:

    python benchmarks/model_mask_bounds.py [--rows 1280] [--d-in 5120] [--vectors 8]

No GPU needed (torch on the CPU, 5 s). The eleventh session's figures (d_in 5120, k 51, 8 vectors
of 1280 rows): 49 blocks on average reach s_k by their exact maximum; by the 8-column bound 182
(99th percentile 220; 99.9 % of rows above 128), by a 4-column bound 138 (74 % of rows above 128);
with heavy columns 167 and 128. Such a prefilter would overflow the 128-block list in most rows.
The thirteenth session built it with 2-column bounds instead (the kernel's bound path,
``mask_bound_kernel``; ``model_mask_warp.py --bounds`` models it): by them 84 blocks on average reach s_k
at d_in 5120.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]


def blocks_reaching(weight: torch.Tensor, norms: torch.Tensor, k: int, width: int) -> dict[str, torch.Tensor]:
    """Per row: blocks of `width` columns whose exact maximum / upper bound reaches the k-th largest score."""
    rows, d_in = weight.shape
    w = weight.float().abs()
    scores = w * norms
    kth = scores.topk(k, dim=1).values[:, -1:]
    n_blocks = d_in // width
    exact = scores.view(rows, n_blocks, width).amax(-1)
    bound = w.view(rows, n_blocks, width).amax(-1) * norms.view(n_blocks, width).amax(-1)
    return {"exact": (exact >= kth).sum(1), "bound": (bound >= kth).sum(1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1280)
    parser.add_argument("--d-in", type=int, default=5120)
    parser.add_argument("--vectors", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from _masks import SPARSITY, layer_stats

    import memloc_kernels as mk

    k = mk.topk_count(SPARSITY, args.d_in)
    print(f"d_in {args.d_in}, k {k}, {args.rows} rows x {args.vectors} vectors; blocks reaching the k-th score")
    print(f"{'data':<7} {'block':>5} {'exact mean':>10} {'bound mean':>10} {'bound p99':>9} {'bound max':>9} "
          f"{'rows > 128':>10}")
    for heavy in (False, True):
        weights, sumsqs, _ = layer_stats([(args.rows, args.d_in)], (args.vectors,), seed=args.seed, heavy=heavy,
                                         device="cpu")
        for width in (8, 4):
            got = [blocks_reaching(weights[0], s.sqrt(), k, width) for s in sumsqs[0]]
            exact = torch.cat([g["exact"] for g in got]).float()
            bound = torch.cat([g["bound"] for g in got]).float()
            print(f"{'heavy' if heavy else 'plain':<7} {width:>5} {exact.mean():>10.1f} {bound.mean():>10.1f} "
                  f"{bound.quantile(0.99):>9.0f} {bound.max():>9.0f} {(bound > 128).float().mean():>9.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
