"""Sweep the Triton apply_mask/restore tile (rows, words, warps) at SD1.5 scale: 76800 x 5120 fp16, 1 %.

Run from the repository root on a CUDA machine: python benchmarks/bench_prune_tiles.py
Each tile is checked bit-exact (pruned weight, removed values, restored weight) before it is timed.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

import torch  # noqa: E402

# The set-bit walk (session 3): one word per lane, so tiles differ in words per lane and rows per program.
# (The column-slot kernel before it: (1, 32, 1) fastest of 9 tiles, 2026-11-29, BENCHMARKS.md.)
TILES = [(1, 32, 1), (1, 64, 1), (1, 128, 1), (2, 32, 2), (4, 32, 4), (8, 32, 8)]


def main() -> int:
    import triton.testing as tt

    import memloc_kernels as mk
    from memloc_kernels.triton import prune

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(76800, 5120, device="cuda", dtype=torch.float16, generator=g)
    mask = mk.pack_mask(torch.rand(76800, 5120, device="cuda", generator=g) < 0.01)
    original = w.clone()
    copy_ms = tt.do_bench(lambda: original.clone(), rep=100)
    dense_bytes = 2 * w.numel() * 2 + mask.words.numel() * 4
    copy_gbs = 2 * w.numel() * 2 / copy_ms / 1e6
    print(f"copy {copy_gbs:.0f} GB/s")
    for tile in TILES:
        prune.TILE = tile
        rec = mk.apply_mask(w, mask, backend="triton")
        ok = bool((w.view(torch.int16)[mk.unpack_mask(mask)] == 0).all())
        mk.restore(w, rec, backend="triton")
        ok = ok and torch.equal(w.view(torch.int16), original.view(torch.int16))

        words = mask.words.view(76800, -1)
        starts = prune._starts(words)[0]
        scratch = torch.empty_like(rec.removed)
        ap = tt.do_bench(lambda s=scratch, st=starts, wd=words: prune._launch(w, wd, s, st, restore=False), rep=100)
        # the whole op (popcounts, offsets, one sync, allocation, kernel): W is already zero where
        # masked, so every repeat moves the same bytes
        whole = tt.do_bench(lambda: mk.apply_mask(w, mask, backend="triton"), rep=100)
        mk.restore(w, rec, backend="triton")
        gbs = dense_bytes / (ap * 1e-3) / 1e9
        whole_gbs = dense_bytes / (whole * 1e-3) / 1e9
        print(f"tile {tile}: apply kernel {ap * 1e3:8.1f} us = {gbs / copy_gbs * 100:.0f}% of copy as a dense pass; "
              f"whole op {whole * 1e3:8.1f} us = {whole_gbs / copy_gbs * 100:.0f}%; exact {ok}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
