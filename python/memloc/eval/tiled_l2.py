"""Carlini et al.'s tiled L2 distance: the RMS difference of the worst of a grid of corresponding tiles.

Definition (Carlini et al. 2023, "Extracting Training Data from Diffusion Models"): a plain L2
distance calls two images close when they share a large flat background, so each image is cut into
non-overlapping tiles (16 tiles of 128 x 128 for Stable Diffusion's 512 x 512 images, i.e. a 4 x 4
grid) and the distance of a pair is the *maximum over corresponding tiles* of the tile-wise L2
distance. Here each tile's L2 distance is normalized by the square root of its number of values,
as Carlini et al. normalize L2, so a tile distance is the RMS difference of that tile.

Units and scale, chosen so that the number does not depend on the resolution:
- images are compared at their own resolution (generations of one model all share one size;
  training images are resized to it by :func:`memloc.eval.loading.TrainingImages.at_size`);
- pixel values are on the 8-bit scale 0..255 (generations are rounded to uint8 as when saved to
  PNG), so a distance is "the RMS difference of the worst tile, in 8-bit levels"; Carlini et al.'s
  normalized L2 on a 0..1 scale is this value / 255;
- the grid is ``grid x grid`` tiles (default 4, Carlini's 16 tiles); sizes that do not divide by
  ``grid`` get tiles whose sizes differ by one pixel (bounds ``floor(i * H / grid)``).

The memorization-localization paper (Section 5.4) uses a threshold of 50. We read it as 50 of
these units (RMS 50/255 = 0.196 on a 0..1 scale). If instead it is the *unnormalized* L2 of a
128 x 128 x 3 tile on a 0..1 scale, it is 50 / sqrt(49152) = 0.2255 on a 0..1 scale, i.e. 57.5 of
these units: :func:`threshold_from_tile_l2` converts. Both readings put a near copy at about
0.2 RMS on a 0..1 scale in the worst tile.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: The memorization-localization paper's threshold, in this module's units (8-bit levels, RMS).
PAPER_THRESHOLD = 50.0
#: Carlini et al.'s grid: 16 non-overlapping tiles.
DEFAULT_GRID = 4


def threshold_from_tile_l2(l2: float, tile_values: int = 128 * 128 * 3, value_scale: float = 1.0) -> float:
    """Convert an unnormalized per-tile L2 threshold to this module's units (RMS in 8-bit levels).

    ``tile_values`` is the number of values in one tile (128 * 128 * 3 for SD's 512 x 512 RGB
    images on a 4 x 4 grid); ``value_scale`` the pixel range the L2 was measured on (1.0 for 0..1,
    255.0 for 0..255, 2.0 for -1..1).
    """
    if l2 < 0 or tile_values <= 0 or value_scale <= 0:
        raise ValueError(f"need l2 >= 0, tile_values > 0, value_scale > 0, got {l2}, {tile_values}, {value_scale}")
    return l2 / math.sqrt(tile_values) * (255.0 / value_scale)


def tile_bounds(length: int, grid: int) -> list[tuple[int, int]]:
    """``grid`` contiguous ``[start, stop)`` ranges covering ``range(length)``, sizes differing by at most one."""
    return [(length * i // grid, length * (i + 1) // grid) for i in range(grid)]


def _as_batch(name: str, images, device: torch.device) -> torch.Tensor:
    """Images ``[N, H, W, C]`` (or one ``[H, W, C]``) as float64 on ``device``."""
    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape [N, H, W, C] or [H, W, C] (0..255 values), got {tuple(t.shape)}")
    # float64: a tile of SD has 49,152 values; exact enough that tests can compare hand-computed values
    return t.detach().to(device, torch.float64)


def tiled_l2(a, b=None, *, grid: int = DEFAULT_GRID, device: str | torch.device = "cpu") -> torch.Tensor:
    """Tiled L2 distances between every image of ``a`` and every image of ``b`` (default: ``a``).

    Args:
        a: images ``[N, H, W, C]`` or ``[H, W, C]`` with values on the 0..255 scale (uint8 or float).
        b: images ``[M, H, W, C]`` of the same size, or None for all pairs within ``a``.
        grid: tiles per side.
        device: where to compute (a GPU makes Stable Diffusion-sized batches fast).
    Returns:
        float64 ``[N, M]`` on the CPU: for each pair, max over the ``grid * grid`` corresponding tiles of the
        tile's RMS difference (0..255 units). With ``b=None`` the diagonal is exactly 0.
    """
    device = torch.device(device)
    ta = _as_batch("a", a, device)
    tb = ta if b is None else _as_batch("b", b, device)
    if ta.shape[1:] != tb.shape[1:]:
        raise ValueError(f"a and b must hold images of one size, got {tuple(ta.shape[1:])} and {tuple(tb.shape[1:])}")
    height, width = ta.shape[1], ta.shape[2]
    if isinstance(grid, bool) or not isinstance(grid, int) or not 1 <= grid <= min(height, width):
        raise ValueError(f"grid must be an int in [1, {min(height, width)}] for {height}x{width} images, got {grid!r}")
    out = torch.zeros(ta.shape[0], tb.shape[0], dtype=torch.float64, device=device)
    if out.numel() == 0:
        return out.cpu()
    for y0, y1 in tile_bounds(height, grid):
        for x0, x1 in tile_bounds(width, grid):
            tile_a = ta[:, y0:y1, x0:x1].reshape(ta.shape[0], -1)
            tile_b = tb[:, y0:y1, x0:x1].reshape(tb.shape[0], -1)
            # direct differences, not the |a|^2 + |b|^2 - 2ab expansion, which cancels for near copies
            dist = torch.cdist(tile_a[None], tile_b[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
            torch.maximum(out, dist / math.sqrt(tile_a.shape[1]), out=out)
    if b is None:
        out.fill_diagonal_(0.0)
    return out.cpu()
