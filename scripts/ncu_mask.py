"""Run SD1.5's memorized_masks (one vector, default Triton kernel) a few times, for ncu to profile.

On the GPU machine:  ncu --clock-control none --kernel-name regex:mask_kernel --launch-skip 2
--launch-count 1 --set full -o $OUT/mask python scripts/ncu_mask.py   (see scripts/ncu_mask.sh)
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python"), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from _masks import SD15, SPARSITY, empty_outs, layer_stats  # noqa: E402

import memloc_kernels as mk  # noqa: E402

data = layer_stats(SD15, ())
outs = empty_outs(mk, data[0], ())
for _ in range(4):
    mk.memorized_masks(*data, SPARSITY, outs=outs, check_finite=False, backend="triton")
torch.cuda.synchronize()
print("ok")
