"""Read a generic image's attributes (background, colour, count, shape, position) back from its pixels."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .shapes import BACKGROUNDS, COLOURS, FRAME, POSITIONS, SHAPES, SQUARE_HALF, inside_shape

# An object's pixels differ from the background by at least ~0.43 (purple on gray); half of
# the strongest difference marks half-covered edge pixels, so masks keep the drawn outline.
MIN_CONTRAST = 0.2
# Smallest object drawn is a triangle of radius 3.5 (area 24.5 px in the 32-pixel frame).
MIN_AREA = 6.0


@dataclass
class Detected:
    """What the checker read from one image."""

    background: str
    count: int
    colour: str | None
    shape: str | None
    position: str | None

    def as_dict(self) -> dict:
        return asdict(self)


def _nearest(value: np.ndarray, palette: dict[str, tuple[float, float, float]]) -> str:
    names = list(palette)
    d = np.linalg.norm(np.asarray([palette[k] for k in names]) - value[None, :], axis=1)
    return names[int(d.argmin())]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a 2-D bool mask, each as an ``[n, 2]`` array of (y, x)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pts = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pts.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(np.asarray(pts))
    return comps


def _classify_shape(cover: np.ndarray, pts: np.ndarray) -> str:
    """Shape of one component: the template with the best soft IoU against the pixel coverage.

    Templates share the component's bounding-box centre; three radii per shape absorb the
    error of reading the size off a thresholded mask.
    """
    size = cover.shape[0]
    scale = size / FRAME
    (y0, x0), (y1, x1) = pts.min(0), pts.max(0)
    cx, cy = (x0 + x1 + 1) / 2 / scale, (y0 + y1 + 1) / 2 / scale
    half = ((x1 - x0 + 1) + (y1 - y0 + 1)) / 4 / scale
    wy0, wy1 = max(y0 - 2, 0), min(y1 + 3, size)
    wx0, wx1 = max(x0 - 2, 0), min(x1 + 3, size)
    window = torch.from_numpy(cover[wy0:wy1, wx0:wx1].copy())
    sub = 2
    ys = (torch.arange(wy0 * sub, wy1 * sub) + 0.5) / sub / scale
    xs = (torch.arange(wx0 * sub, wx1 * sub) + 0.5) / sub / scale
    factors = torch.tensor([0.9, 1.0, 1.1])
    base = torch.tensor([half, half / SQUARE_HALF, half])  # circle, square, triangle
    shape = torch.arange(len(SHAPES)).repeat_interleave(len(factors)).view(-1, 1, 1)
    r = (base[:, None] * factors[None, :]).reshape(-1, 1, 1)
    inside = inside_shape(shape, xs.view(1, 1, -1) - cx, ys.view(1, -1, 1) - cy, r).float()
    h, w = window.shape
    templ = inside.view(-1, h, sub, w, sub).mean(dim=(2, 4))
    iou = torch.minimum(templ, window).sum((1, 2)) / torch.maximum(templ, window).sum((1, 2)).clamp_min(1e-6)
    return SHAPES[int(iou.argmax()) // len(factors)]


def detect(image: np.ndarray) -> Detected:
    """Read attributes from one ``[H, W, 3]`` image (uint8, or float in [0, 1])."""
    img = np.asarray(image)
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    size = img.shape[0]
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    dist = np.linalg.norm(img - bg_rgb[None, None, :], axis=-1)
    peak = float(np.percentile(dist, 99.5))
    if peak < MIN_CONTRAST:
        return Detected(background, 0, None, None, None)
    fg = dist > 0.5 * peak
    min_area = MIN_AREA * (size / FRAME) ** 2
    comps = [c for c in _components(fg) if len(c) >= min_area]
    if not comps:
        return Detected(background, 0, None, None, None)
    core = dist > 0.75 * peak
    colour = _nearest(np.median(img[core], axis=0), COLOURS)
    cover = np.clip(dist / float(np.median(dist[core])), 0.0, 1.0)
    shapes = [_classify_shape(cover, c) for c in comps]
    shape = max(SHAPES, key=lambda s: (shapes.count(s), -SHAPES.index(s)))
    # The bounding-box centre, not the centroid: a triangle's mass sits low.
    pts = np.concatenate(comps)
    (y0, x0), (y1, x1) = pts.min(0), pts.max(0)
    centre = np.array([(x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2]) * (FRAME / size)
    anchors = np.asarray(list(POSITIONS.values()))
    position = list(POSITIONS)[int(np.linalg.norm(anchors - centre[None], axis=1).argmin())]
    return Detected(background, len(comps), colour, shape, position)


ATTRIBUTES = ("background", "colour", "count", "shape", "position")


def attribute_hits(found: Detected, attrs: dict) -> dict[str, bool]:
    """Which of the caption's attributes ``found`` satisfies; ``position`` only for single objects.

    ``all`` is True when every checked attribute holds.
    """
    hits = {
        "background": found.background == attrs["background"],
        "colour": found.colour == attrs["colour"],
        "count": found.count == attrs["count"],
        "shape": found.shape == attrs["shape"],
    }
    if attrs["count"] == 1:
        hits["position"] = found.count == 1 and found.position == attrs["position"]
    hits["all"] = all(hits.values())
    return hits
