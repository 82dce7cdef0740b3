"""The CUDA warp kernel of memorized_mask under Nsight Compute: one SD1.5 call with one vector, one batched 100 x 10.

Warms up first, then profiles only the calls between cudaProfilerStart and Stop:
    ncu --clock-control none --profile-from-start off --kernel-name regex:mask_warp \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \\
        python benchmarks/ncu_cuda_mask.py [--only single|batched]
With --only, the profiled range holds that call alone (its launches widest first), so that
``--launch-count 1`` selects its width-20 launch (scripts/ncu_warp_regions.sh).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python"), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from _masks import SD15, SPARSITY, empty_outs, layer_stats  # noqa: E402


def main() -> int:
    import argparse

    import memloc_kernels as mk

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["single", "batched"], help="profile this call alone")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to profile")
        return 1
    calls = []
    leads = {"single": [()], "batched": [(100, 10)], None: [(), (100, 10)]}[args.only]
    for lead in leads:
        weights, sumsqs, nulls = layer_stats(SD15, lead)
        outs = empty_outs(mk, weights, lead)
        calls.append(lambda w=weights, s=sumsqs, n=nulls, o=outs: mk.memorized_masks(
            w, s, n, SPARSITY, outs=o, check_finite=False, backend="cuda"))
    for call in calls:  # compile, allocate, warm the caches
        for _ in range(3):
            call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("profiled:", {"single": "SD1.5 one vector", "batched": "SD1.5 100 x 10",
                        None: "SD1.5 one vector, then 100 x 10"}[args.only])
    return 0


if __name__ == "__main__":
    sys.exit(main())
