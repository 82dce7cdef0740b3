"""apply_mask / restore: zero masked weights in place, keeping their bits compact for an exact undo."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bits import popcount32
from .iou import mask_popcount_triton

_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
#: (rows, mask words, warps) per program: one row of 32 words (1024 columns) per step in one warp
#: was fastest of 9 tiles on the H200 (539 us for 76800 x 5120 at 1 %, 71 % of copy; BENCHMARKS.md).
TILE = (1, 32, 1)


@triton.jit
def _prune_kernel(w_ptr, words_ptr, removed_ptr, start_ptr, d_out, d_in, n_words,
                  BR: tl.constexpr, BW: tl.constexpr, RESTORE: tl.constexpr, HW: tl.constexpr):
    """Rows ``[BR]``, ``BW`` mask words per step: a removed value's slot is ``start[row]`` + the set
    bits of the row's earlier words (a short scan over words) + the set bits below it in its own
    word (one popcount): no scan over columns. Apply: copy W there, then zero W. Restore: copy back.

    W is moved as integers of its width, so every bit pattern (signed zeros, NaN payloads) is
    kept. Only the masked elements of W are read or written.
    """
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_on = rows < d_out
    r64 = rows.to(tl.int64)
    slot = tl.load(start_ptr + rows, mask=row_on, other=0)  # int64 running slot per row
    j = tl.arange(0, 32)
    below = (1 << j) - 1  # bits under bit j (j = 31: 0x7FFFFFFF after the int32 wrap)
    for w0 in range(0, n_words, BW):
        wi = w0 + tl.arange(0, BW)
        on = row_on[:, None] & (wi < n_words)[None, :]
        word = tl.load(words_ptr + r64[:, None] * n_words + wi[None, :], mask=on, other=0)  # [BR, BW]
        count = popcount32(word, HW)
        before = tl.cumsum(count, axis=1) - count  # set bits in the row's earlier words of this step
        cols = wi[None, :, None] * 32 + j[None, None, :]  # [1, BW, 32]
        bit = (((word[:, :, None] >> j[None, None, :]) & 1) != 0) & (cols < d_in)
        rank = before[:, :, None] + popcount32(word[:, :, None] & below[None, None, :], HW)
        dst = removed_ptr + slot[:, None, None] + rank
        src = w_ptr + r64[:, None, None] * d_in + cols
        if RESTORE:
            tl.store(src, tl.load(dst, mask=bit), mask=bit)
        else:
            tl.store(dst, tl.load(src, mask=bit), mask=bit)
            tl.store(src, tl.zeros([BR, BW, 32], dtype=w_ptr.dtype.element_ty), mask=bit)
        slot += tl.sum(count, axis=1).to(tl.int64)


def _starts(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = mask_popcount_triton(words)
    ends = torch.cumsum(counts, 0)
    return ends - counts, ends


def _launch(weight: torch.Tensor, words: torch.Tensor, removed: torch.Tensor, starts: torch.Tensor,
            restore: bool) -> None:
    d_out, d_in = weight.shape
    ints = _INT_VIEW[weight.element_size()]
    br, bw, warps = TILE
    _prune_kernel[(triton.cdiv(d_out, br),)](weight.view(ints), words, removed.view(ints), starts, d_out, d_in,
                                             words.shape[1], BR=br, BW=bw, RESTORE=restore, HW=weight.is_cuda,
                                             num_warps=warps)


def apply_mask_triton(weight: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Zero ``weight`` ``[d_out, d_in]`` where ``words`` ``[d_out, n_words]`` has bits; returns the
    removed values in row-major order (one device sync: the count sizes the result)."""
    starts, ends = _starts(words)
    removed = torch.empty(int(ends[-1]), dtype=weight.dtype, device=weight.device)
    if removed.numel():
        _launch(weight, words, removed, starts, restore=False)
    return removed


def restore_triton(weight: torch.Tensor, words: torch.Tensor, removed: torch.Tensor) -> None:
    """Write ``removed`` back where ``words`` has bits (exact undo of :func:`apply_mask_triton`)."""
    if removed.numel() == 0:
        return
    starts, ends = _starts(words)
    if int(ends[-1]) != removed.numel():  # a mismatched record would read past `removed`
        raise ValueError(f"record holds {removed.numel()} removed values but its mask has {int(ends[-1])} bits")
    _launch(weight, words, removed.contiguous(), starts, restore=True)
