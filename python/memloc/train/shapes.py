"""Procedural generic training images (shapes on plain backgrounds) whose captions state checkable attributes."""

# Geometry is defined in a 32-pixel frame and scaled to the image size, so the same code draws
# 32x32 training images and 16x16 test images. An image holds one to three objects of one colour
# and one shape; a single object sits at one of five named positions, several objects sit in
# distinct cells of a 2x2 grid so that they never touch (the checker counts connected components).

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FRAME = 32.0

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.12, 0.66, 0.16),
    "blue": (0.14, 0.24, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.58, 0.18, 0.78),
    "cyan": (0.10, 0.80, 0.86),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.06, 0.06, 0.06),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.50, 0.50, 0.50),
}
SHAPES = ("circle", "square", "triangle")
# (x, y) anchors of a single object, in the 32-pixel frame.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (9.0, 16.0),
    "right": (23.0, 16.0),
    "top": (16.0, 9.0),
    "bottom": (16.0, 23.0),
    "center": (16.0, 16.0),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
NO_POSITION = len(POSITIONS)  # position code of images with several objects
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
GRID_CELLS = ((8.0, 8.0), (24.0, 8.0), (8.0, 24.0), (24.0, 24.0))
MAX_OBJECTS = 3
# A square of half-side 0.886 r has the area of a circle of radius r.
SQUARE_HALF = 0.886

# Columns of the integer attribute table.
COUNT, COLOUR, SHAPE, POSITION, BACKGROUND = range(5)

_COLOUR_NAMES = tuple(COLOURS)
_BACKGROUND_NAMES = tuple(BACKGROUNDS)
_POSITION_NAMES = tuple(POSITIONS)


def caption_for(count: int, colour: str, shape: str, position: str | None, background: str) -> str:
    """The caption of an image with these attributes (``position`` only for a single object)."""
    if count == 1:
        return f"a {colour} {shape} {POSITION_PHRASES[position]} on a {background} background"
    return f"{COUNT_WORDS[count]} {colour} {shape}s on a {background} background"


def attributes_dict(row: tuple[int, int, int, int, int] | list[int]) -> dict:
    """Integer attribute row -> readable attributes (the form stored in manifests)."""
    count, colour, shape, position, background = (int(v) for v in row)
    return {
        "count": count,
        "colour": _COLOUR_NAMES[colour],
        "shape": SHAPES[shape],
        "position": _POSITION_NAMES[position] if count == 1 else None,
        "background": _BACKGROUND_NAMES[background],
    }


def attributes_row(attrs: dict) -> tuple[int, int, int, int, int]:
    """Readable attributes -> integer attribute row."""
    count = int(attrs["count"])
    position = _POSITION_NAMES.index(attrs["position"]) if count == 1 else NO_POSITION
    return (
        count,
        _COLOUR_NAMES.index(attrs["colour"]),
        SHAPES.index(attrs["shape"]),
        position,
        _BACKGROUND_NAMES.index(attrs["background"]),
    )


class CaptionTable:
    """Every generic caption, in a fixed order, with a tensor lookup from attribute rows to caption index."""

    def __init__(self) -> None:
        rows = []
        for count in (1, 2, 3):
            positions = range(len(POSITIONS)) if count == 1 else (NO_POSITION,)
            for colour, shape, position, background in itertools.product(
                range(len(COLOURS)), range(len(SHAPES)), positions, range(len(BACKGROUNDS))
            ):
                rows.append((count, colour, shape, position, background))
        self.rows = rows
        self.captions = [caption_for(**attributes_dict(r)) for r in rows]
        lookup = torch.full((MAX_OBJECTS + 1, len(COLOURS), len(SHAPES), NO_POSITION + 1, len(BACKGROUNDS)), -1)
        for i, r in enumerate(rows):
            lookup[r] = i
        self.lookup = lookup

    def __len__(self) -> int:
        return len(self.captions)

    def index(self, attrs: torch.Tensor) -> torch.Tensor:
        """Caption index of each row of an ``[N, 5]`` attribute table."""
        a = attrs.cpu()
        idx = self.lookup[a[:, COUNT], a[:, COLOUR], a[:, SHAPE], a[:, POSITION], a[:, BACKGROUND]]
        if (idx < 0).any():
            raise ValueError("attribute table holds a combination that has no caption")
        return idx

    def eval_set(self, per_count: int = 8, seed: int = 0) -> list[dict]:
        """A balanced evaluation subset: ``per_count`` captions for each object count, chosen by ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        chosen = []
        for count in (1, 2, 3):
            idx = [i for i, r in enumerate(self.rows) if r[COUNT] == count]
            perm = torch.randperm(len(idx), generator=gen)[:per_count].tolist()
            chosen += [idx[j] for j in sorted(perm)]
        return [{"caption": self.captions[i], "attributes": attributes_dict(self.rows[i])} for i in chosen]


@dataclass
class GenericSpec:
    """Everything that determines a batch of generic images (CPU tensors; rendering is deterministic)."""

    attrs: torch.Tensor  # [N, 5] int64: count, colour, shape, position, background
    centres: torch.Tensor  # [N, 3, 2] float32 (x, y) in the 32-pixel frame
    radii: torch.Tensor  # [N, 3] float32
    colour_rgb: torch.Tensor  # [N, 3] float32 in [0, 1]
    background_rgb: torch.Tensor  # [N, 3] float32 in [0, 1]

    def __len__(self) -> int:
        return self.attrs.shape[0]


def sample_generic(n: int, seed: int, attrs: torch.Tensor | None = None) -> GenericSpec:
    """Draw ``n`` generic images' attributes and geometry from ``seed`` (same seed, same images).

    With ``attrs`` ([n, 5] attribute rows) only the geometry and colour jitter are drawn.
    """
    gen = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=gen)
    count = 1 + torch.multinomial(torch.tensor([0.5, 0.25, 0.25]), n, replacement=True, generator=gen)
    colour = torch.randint(len(COLOURS), (n,), generator=gen)
    shape = torch.randint(len(SHAPES), (n,), generator=gen)
    position = torch.randint(len(POSITIONS), (n,), generator=gen)
    background = torch.randint(len(BACKGROUNDS), (n,), generator=gen)
    position = torch.where(count == 1, position, torch.full_like(position, NO_POSITION))
    if attrs is not None:
        if attrs.shape != (n, 5):
            raise ValueError(f"attrs must have shape [{n}, 5], got {tuple(attrs.shape)}")
        count, colour, shape, position, background = attrs.long().unbind(dim=1)

    anchors = torch.tensor(list(POSITIONS.values()))  # [5, 2]
    cells = torch.tensor(GRID_CELLS)  # [4, 2]
    cell_order = torch.argsort(u(n, len(GRID_CELLS)), dim=1)[:, :MAX_OBJECTS]  # distinct cells
    single = (count == 1)[:, None, None]
    anchor = anchors[position.clamp(max=len(POSITIONS) - 1)][:, None, :].expand(n, MAX_OBJECTS, 2)
    centres = torch.where(single, anchor, cells[cell_order])
    jitter = torch.where(single, torch.tensor(1.5), torch.tensor(1.0))
    centres = centres + (2 * u(n, MAX_OBJECTS, 2) - 1) * jitter
    radii = torch.where(single[:, :, 0], 4.5 + 2.0 * u(n, MAX_OBJECTS), 3.5 + 1.5 * u(n, MAX_OBJECTS))

    palette = torch.tensor(list(COLOURS.values()))
    bg_palette = torch.tensor(list(BACKGROUNDS.values()))
    colour_rgb = (palette[colour] + 0.1 * (u(n, 3) - 0.5)).clamp(0, 1)
    background_rgb = (bg_palette[background] + 0.06 * (u(n, 3) - 0.5)).clamp(0, 1)
    attrs = torch.stack([count, colour, shape, position, background], dim=1)
    return GenericSpec(attrs, centres.float(), radii.float(), colour_rgb.float(), background_rgb.float())


def inside_shape(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Whether offsets (dx, dy) from an object's centre fall inside it (broadcasting tensors)."""
    circle = dx * dx + dy * dy <= r * r
    half = SQUARE_HALF * r
    square = (dx.abs() <= half) & (dy.abs() <= half)
    triangle = (dy <= r) & (dx.abs() <= (dy + r) * 0.5)  # apex up: zero width at dy = -r
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))


def coverage(
    shape: torch.Tensor,
    centres: torch.Tensor,
    radii: torch.Tensor,
    active: torch.Tensor,
    size: int,
    supersample: int = 2,
) -> torch.Tensor:
    """Fraction of each pixel covered by the active objects: ``[N, size, size]`` in [0, 1].

    ``shape`` [N, K] (index into SHAPES), ``centres`` [N, K, 2], ``radii`` [N, K], ``active``
    [N, K] bool, all in the 32-pixel frame; objects are assumed not to overlap.
    """
    device = centres.device
    n_sub = size * supersample
    coords = (torch.arange(n_sub, device=device, dtype=torch.float32) + 0.5) / supersample * (FRAME / size)
    x = coords.view(1, 1, 1, n_sub)
    y = coords.view(1, 1, n_sub, 1)
    dx = x - centres[..., 0, None, None]
    dy = y - centres[..., 1, None, None]
    inside = inside_shape(shape[..., None, None], dx, dy, radii[..., None, None]) & active[..., None, None]
    covered = inside.any(dim=1).float()
    return F.avg_pool2d(covered[:, None], supersample)[:, 0]


def render(spec: GenericSpec, size: int = 32, device: str | torch.device = "cpu", chunk: int = 2048) -> torch.Tensor:
    """Draw the images of ``spec``: uint8 ``[N, 3, size, size]`` on ``device``."""
    out = torch.empty((len(spec), 3, size, size), dtype=torch.uint8, device=device)
    slots = torch.arange(MAX_OBJECTS)
    for start in range(0, len(spec), chunk):
        sl = slice(start, start + chunk)
        attrs = spec.attrs[sl]
        shape = attrs[:, SHAPE, None].expand(-1, MAX_OBJECTS)
        active = slots[None, :] < attrs[:, COUNT, None]
        cov = coverage(
            shape.to(device), spec.centres[sl].to(device), spec.radii[sl].to(device), active.to(device), size
        )[:, None]
        fg = spec.colour_rgb[sl].to(device)[:, :, None, None]
        bg = spec.background_rgb[sl].to(device)[:, :, None, None]
        img = bg * (1 - cov) + fg * cov
        out[sl] = (img * 255).round().clamp(0, 255).to(torch.uint8)
    return out
