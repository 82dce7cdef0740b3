"""Launch settings of every Triton kernel in one place: short documented heuristics, overridable."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small stand-in under the interpreter)."""
    if device.type != "cuda":
        return 2
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def pow2_ceil(x: int) -> int:
    return 1 << (max(1, x) - 1).bit_length()


# ---------------------------------------------------------------------------------------------
# memorized_mask
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """How one memorized_mask launch splits the work.

    A program owns one weight row at a time, held in registers as |W| in float32: a power-of-two
    block ``pa`` plus a remainder block ``pb`` (1280/2560/5120-wide rows carry no padding), each
    laid out as ``[R, 32 * num_warps, vec]`` (column ``(r * NT + t) * vec + j`` in thread ``t``).
    ``sa`` bound groups per thread in block A (plus one in block B) give the lower bound; ``cand``
    candidate groups of ``vec`` columns fit the per-vector buffer; ``chunk`` vectors have their
    candidate selections run together (hides the bisection's latency). ``dense`` selects the exact
    full-row path for every vector (when k is large). ``progs_per_sm`` sizes the persistent grid
    until the first launch has told how many programs per SM the compiled kernel's registers allow.
    ``fallback``: where the rare vectors that the candidate path cannot decide (buffer overflow, a
    tie at the k-th place) get the exact dense path: ``"inline"`` in the main kernel, or
    ``"deferred"`` to a second kernel over (row, vector) flags, which keeps the dense path's
    registers out of the main kernel (see docs/TRITON_MASK_NOTES.md). ``maxnreg``: a register cap
    for the main kernel (0: none), so that more programs fit on an SM.
    """

    num_warps: int
    pa: int
    pb: int
    vec: int
    sa: int
    cand: int
    chunk: int
    dense: bool
    progs_per_sm: int
    fallback: str = "inline"
    maxnreg: int = 0


# Fields a benchmark or a user may force (``mask_overrides(chunk=4)``).
_MASK_OVERRIDES: dict[str, object] = {}
_MASK_FIELDS = ("num_warps", "vec", "cand", "chunk", "dense", "progs_per_sm", "fallback", "maxnreg", "kernel")

# The defaults of the two variant switches, from benchmarks/bench_mask_variants.py on an H200
# (2026-11-29, Triton 3.6; docs/TRITON_MASK_NOTES.md): SD1.5 single / batched per vector:
# inline 424 / 268 us, deferred 396 / 262 us, deferred + maxnreg 168: 353 / 259 us (all exact).
MASK_FALLBACK = "deferred"
MASK_MAXNREG = 168


@contextlib.contextmanager
def mask_overrides(**fields: object) -> Iterator[None]:
    """Temporarily force fields of :class:`MaskConfig` (for tuning sweeps): ``mask_overrides(chunk=4)``."""
    unknown = set(fields) - set(_MASK_FIELDS)
    if unknown:
        raise ValueError(f"unknown MaskConfig fields: {sorted(unknown)} (allowed: {', '.join(_MASK_FIELDS)})")
    if fields.get("fallback", "inline") not in ("inline", "deferred"):
        raise ValueError(f"fallback must be 'inline' or 'deferred', got {fields['fallback']!r}")
    if fields.get("kernel", "stream") not in ("stream", "tile"):
        raise ValueError(f"kernel must be 'stream' or 'tile', got {fields['kernel']!r}")
    saved = dict(_MASK_OVERRIDES)
    _MASK_OVERRIDES.update(fields)
    try:
        yield
    finally:
        _MASK_OVERRIDES.clear()
        _MASK_OVERRIDES.update(saved)


def mask_forced(field: str) -> bool:
    """Whether ``field`` is currently forced by :func:`mask_overrides`."""
    return field in _MASK_OVERRIDES


# Which memorized_mask kernel runs: "stream" (mask_stream.py: small programs streaming each row)
# or "tile" (mask.py: a row per program held in registers). Forced with mask_overrides(kernel=...).
MASK_KERNEL = "stream"

# Fields of mask_stream.StreamConfig that a benchmark may force (``stream_overrides(rows=2)``).
_STREAM_OVERRIDES: dict[str, object] = {}
_STREAM_FIELDS = ("variant", "rows", "vectors", "chunk", "cap", "bound_steps", "num_warps", "span", "progs_per_sm",
                  "maxnreg", "prefetch", "stages", "pipe", "group", "by_width", "refine", "serial")


@contextlib.contextmanager
def stream_overrides(**fields: object) -> Iterator[None]:
    """Temporarily force fields of ``mask_stream.StreamConfig`` (tuning sweeps, tests)."""
    unknown = set(fields) - set(_STREAM_FIELDS)
    if unknown:
        raise ValueError(f"unknown StreamConfig fields: {sorted(unknown)} (allowed: {', '.join(_STREAM_FIELDS)})")
    saved = dict(_STREAM_OVERRIDES)
    _STREAM_OVERRIDES.update(fields)
    try:
        yield
    finally:
        _STREAM_OVERRIDES.clear()
        _STREAM_OVERRIDES.update(saved)


def stream_forced() -> dict[str, object]:
    """The StreamConfig fields currently forced by :func:`stream_overrides`."""
    return dict(_STREAM_OVERRIDES)


def mask_kernel() -> str:
    """The memorized_mask kernel to use now: ``"stream"`` or ``"tile"`` (forcing any tile-kernel
    field of :class:`MaskConfig` selects the tile kernel, so its sweeps and tests reach it)."""
    if "kernel" in _MASK_OVERRIDES:
        return str(_MASK_OVERRIDES["kernel"])
    return "tile" if _MASK_OVERRIDES else MASK_KERNEL


# Row elements per thread (for each held array); registers bound how many rows an SM holds.
ELEMENTS_PER_THREAD = 40


def row_blocks(d_in: int) -> tuple[int, int]:
    """``(pa, pb)``: the row as a power-of-two block plus a power-of-two remainder block (or 0).

    1280 = 1024 + 256, 2560 = 2048 + 512, 5120 = 4096 + 1024 carry no padding; rows of at most
    64 columns are one block padded to a power of two >= 32 (so packed words never straddle).
    """
    if d_in <= 64:
        return max(32, pow2_ceil(d_in)), 0
    pa = pow2_floor(d_in)
    rem = d_in - pa
    return pa, (0 if rem == 0 else max(32, pow2_ceil(rem)))


def mask_config(d_in: int, k: int, vectors: int) -> MaskConfig:
    """The heuristic for one memorized_mask launch (``vectors`` = S * T statistics vectors).

    * ``num_warps``: at most ``ELEMENTS_PER_THREAD`` row elements per thread (5120 -> 4 warps,
      2560 -> 2, 1280 -> 1), fewer if a block is narrower than the threads.
    * ``vec``: 2 adjacent columns per candidate group (halves the per-element slot work; a
      candidate group costs twice its share in the exact selection).
    * ``sa``: the fewest bound groups per thread that give >= k groups with a real column.
    * ``cand``: 2.5 k rounded up to a power of two (>= 16) candidate groups per vector.
    * ``dense`` when k > 256 or no bound grouping reaches k groups.
    * ``chunk``: 8 vectors per candidate-selection batch (1 for a single vector).
    """
    pa, pb = row_blocks(d_in)
    narrow = min(pa, pb) if pb else pa
    num_warps = max(1, min(16, pow2_ceil(-(-(pa + pb) // (32 * ELEMENTS_PER_THREAD)))))
    num_warps = int(_MASK_OVERRIDES.get("num_warps", num_warps))
    while num_warps > 1 and 32 * num_warps > narrow:
        num_warps //= 2
    nt = 32 * num_warps
    vec = max(1, min(int(_MASK_OVERRIDES.get("vec", 2)), narrow // nt))
    ra = pa // (nt * vec)
    sa = 1
    while sa < ra and _valid_bound_groups(d_in, pa, pb, nt, vec, sa) < k:
        sa *= 2
    dense = _valid_bound_groups(d_in, pa, pb, nt, vec, sa) < k or k > 256
    cand = max(16, pow2_ceil((5 * k + 1) // 2))
    chunk = 1 if vectors <= 1 else min(8, pow2_ceil(vectors))
    cfg = MaskConfig(num_warps, pa, pb, vec, sa, cand, chunk, dense, progs_per_sm=4, fallback=MASK_FALLBACK,
                     maxnreg=MASK_MAXNREG)
    extra = {f: v for f, v in _MASK_OVERRIDES.items() if f not in ("num_warps", "vec", "kernel")}
    if extra:
        cfg = dataclasses.replace(cfg, **extra)
        if cfg.chunk > 1 and vectors <= 1:
            cfg = dataclasses.replace(cfg, chunk=1)
    return cfg


@functools.cache
def _valid_bound_groups(d_in: int, pa: int, pb: int, nt: int, vec: int, sa: int) -> int:
    """Bound groups (``sa`` per thread in block A, one per thread in block B) with a real column."""
    ra = pa // (nt * vec)
    per = ra // sa
    count = sum(1 for s in range(sa) for t in range(nt) if (s * per * nt + t) * vec < d_in)
    if pb:
        count += sum(1 for t in range(nt) if pa + t * vec < d_in)
    return count


# ---------------------------------------------------------------------------------------------
# streaming statistics (accumulate_sumsq, geglu_sumsq)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StatsConfig:
    """Tile ``block_m`` rows x ``block_n`` features; ``split`` programs share one group's rows."""

    block_m: int
    block_n: int
    split: int
    num_warps: int


def stats_config(rows: int, d: int, groups: int, device: torch.device) -> StatsConfig:
    """Tiles of 32 x 128 (4 warps); split each group's rows over enough programs for 4 waves.

    ``split > 1`` writes per-split partial sums that a second kernel adds in a fixed order, so
    the result is deterministic (no atomics).
    """
    block_n = min(128, max(16, pow2_ceil(d)))
    block_m = 32
    col_blocks = -(-d // block_n)
    group_size = rows // max(1, groups)
    target = 4 * num_sms(device)
    split = max(1, min(-(-target // (groups * col_blocks)), -(-group_size // block_m), 64))
    return StatsConfig(block_m, block_n, split, num_warps=4)


# ---------------------------------------------------------------------------------------------
# small device tables (row -> layer maps, base offsets), cached so repeated calls copy nothing
# ---------------------------------------------------------------------------------------------

_TABLES: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_TABLES_MAX = 256


def device_table(values: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device``, cached by content (no copy when seen before)."""
    key = (values, dtype, str(device))
    table = _TABLES.get(key)
    if table is None:
        table = torch.tensor(values, dtype=dtype).to(device)
        _TABLES[key] = table
        if len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table


def element_offsets(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """A base tensor and each tensor's element offset from it (all of one dtype and device)."""
    base = tensors[0]
    size = base.element_size()
    offsets = []
    for x in tensors:
        delta = x.data_ptr() - base.data_ptr()
        if delta % size:
            raise RuntimeError("tensors of one launch are not aligned to their element size")
        offsets.append(delta // size)
    return base, offsets
