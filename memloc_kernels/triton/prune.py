"""apply_mask / restore: zero masked weights in place, keeping their bits compact for an exact undo."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bits import popcount32
from .iou import mask_popcount_triton

_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
#: (rows, mask words, warps) per program. One lane per mask word: a step handles BR x BW words and
#: loops over their set bits only (``max`` set bits of a word in the tile, ~2 at 1 %).
TILE = (1, 32, 1)


@triton.jit
def _prune_kernel(w_ptr, words_ptr, removed_ptr, start_ptr, d_out, d_in, n_words,
                  BR: tl.constexpr, BW: tl.constexpr, RESTORE: tl.constexpr, HW: tl.constexpr):
    """Rows ``[BR]``, ``BW`` mask words per step, one word per lane. A removed value's slot is
    ``start[row]`` + the set bits of the row's earlier words (a short scan over words) + the set
    bits below it in its own word. Each lane walks its word's set bits lowest first (clear the
    lowest bit per round), so the work follows the bits, not the 32 columns of every word.
    Apply: copy W there, then zero W. Restore: copy back.

    W is moved as integers of its width, so every bit pattern (signed zeros, NaN payloads) is
    kept. Only the masked elements of W are read or written; bits past ``d_in`` are skipped (they
    still take a slot, as the per-row counts include them).
    """
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_on = rows < d_out
    r64 = rows.to(tl.int64)
    slot = tl.load(start_ptr + rows, mask=row_on, other=0)  # int64 running slot per row
    w_rows = w_ptr + r64[:, None] * d_in  # [BR, 1]
    for w0 in range(0, n_words, BW):
        wi = w0 + tl.arange(0, BW)
        on = row_on[:, None] & (wi < n_words)[None, :]
        word = tl.load(words_ptr + r64[:, None] * n_words + wi[None, :], mask=on, other=0)  # [BR, BW]
        count = popcount32(word, HW)
        rank = slot[:, None] + (tl.cumsum(count, axis=1) - count).to(tl.int64)  # slot of the word's lowest bit
        # the bits of columns < d_in (only the last word of a row can hold others)
        tail = d_in - wi * 32
        rem = tl.where(tail[None, :] >= 32, word, word & ((1 << tl.minimum(tl.maximum(tail, 0), 31)) - 1)[None, :])
        col0 = (wi * 32)[None, :]
        while tl.max(tl.max((rem != 0).to(tl.int32), axis=1), axis=0) > 0:
            live = rem != 0
            low = rem & -rem  # the lowest set bit (bit 31 stays itself under the int32 wrap)
            col = col0 + popcount32(low - 1, HW)
            src = w_rows + col
            dst = removed_ptr + rank
            if RESTORE:
                tl.store(src, tl.load(dst, mask=live), mask=live)
            else:
                tl.store(dst, tl.load(src, mask=live), mask=live)
                tl.store(src, tl.zeros([BR, BW], dtype=w_ptr.dtype.element_ty), mask=live)
            rank += 1
            rem = rem & (rem - 1)
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
