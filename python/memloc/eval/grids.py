"""Image grids as PNG: a row-major grid of framed thumbnails."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io import atomic_path

WHITE = (255, 255, 255)


def save_grid(
    path: str | Path,
    tiles: Sequence[tuple[np.ndarray, tuple[int, int, int]]],
    *,
    columns: int = 8,
    max_side: int = 256,
    min_side: int = 96,
) -> None:
    """Save ``(uint8 image [H, W, 3], frame RGB)`` tiles in a grid.

    Thumbnails larger than ``max_side`` are shrunk (bicubic); smaller than ``min_side`` are blown up
    by a whole factor (nearest), so a 32-pixel generation stays visible and crisp.
    """
    from PIL import Image

    if not tiles:
        raise ValueError("tiles must not be empty")
    height, width = tiles[0][0].shape[:2]
    if max(height, width) < min_side:
        factor = -(-min_side // max(height, width))
        th, tw, resample = height * factor, width * factor, Image.NEAREST
    else:
        scale = min(1.0, max_side / max(height, width))
        th, tw, resample = max(1, round(height * scale)), max(1, round(width * scale)), Image.BICUBIC
    pad = 3
    cols = min(columns, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (tw + 2 * pad), rows * (th + 2 * pad)), WHITE)
    for k, (img, frame) in enumerate(tiles):
        x, y = (k % cols) * (tw + 2 * pad), (k // cols) * (th + 2 * pad)
        canvas.paste(Image.new("RGB", (tw + 2 * pad, th + 2 * pad), frame), (x, y))
        thumb = Image.fromarray(np.ascontiguousarray(img))
        if thumb.size != (tw, th):
            thumb = thumb.resize((tw, th), resample)
        canvas.paste(thumb, (x + pad, y + pad))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
