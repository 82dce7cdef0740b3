"""apply_mask / restore: zero masked weights in place, keeping their bits compact for an exact undo."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .iou import mask_popcount_triton

_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _prune_kernel(w_ptr, words_ptr, removed_ptr, start_ptr, d_out, d_in, n_words,
                  BR: tl.constexpr, BC: tl.constexpr, RESTORE: tl.constexpr):
    """Rows ``[BR]``: walk the columns in blocks; the set bits' running rank gives each removed
    value's slot (``start[row]`` + rank). Apply: copy W there, then zero W. Restore: copy back.

    W is moved as integers of its width, so every bit pattern (signed zeros, NaN payloads) is
    kept. Only the masked elements of W are read or written.
    """
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_on = rows < d_out
    r64 = rows.to(tl.int64)
    slot = tl.load(start_ptr + rows, mask=row_on, other=0)  # int64 running slot per row
    for c0 in range(0, d_in, BC):
        cols = c0 + tl.arange(0, BC)
        on = row_on[:, None] & (cols < d_in)[None, :]
        word = tl.load(words_ptr + r64[:, None] * n_words + (cols >> 5)[None, :], mask=on, other=0)
        bit = ((word >> (cols & 31)[None, :]) & 1) != 0
        bit = bit & on
        rank = tl.cumsum(bit.to(tl.int32), axis=1) - 1
        dst = removed_ptr + slot[:, None] + rank
        src = w_ptr + r64[:, None] * d_in + cols[None, :]
        if RESTORE:
            tl.store(src, tl.load(dst, mask=bit), mask=bit)
        else:
            tl.store(dst, tl.load(src, mask=bit), mask=bit)
            tl.store(src, tl.zeros([BR, BC], dtype=w_ptr.dtype.element_ty), mask=bit)
        slot += tl.sum(bit.to(tl.int64), axis=1)


def _starts(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = mask_popcount_triton(words)
    ends = torch.cumsum(counts, 0)
    return ends - counts, ends


def _launch(weight: torch.Tensor, words: torch.Tensor, removed: torch.Tensor, starts: torch.Tensor,
            restore: bool) -> None:
    d_out, d_in = weight.shape
    ints = _INT_VIEW[weight.element_size()]
    br, bc = 4, 512
    _prune_kernel[(triton.cdiv(d_out, br),)](weight.view(ints), words, removed.view(ints), starts, d_out, d_in,
                                             words.shape[1], BR=br, BC=bc, RESTORE=restore, num_warps=4)


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
