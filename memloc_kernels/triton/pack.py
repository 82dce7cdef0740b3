"""pack_mask / unpack_mask: bool masks <-> int32 words (bit j % 32 of word j // 32, LSB first)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _pack_kernel(mask_ptr, words_ptr, n_rows, d_in, n_words, BR: tl.constexpr, BW: tl.constexpr):
    """Words ``[BR, BW]`` from mask bytes ``[BR, 32 * BW]``; bits past ``d_in`` stay zero."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    wi = tl.program_id(1) * BW + tl.arange(0, BW)
    cols = tl.program_id(1) * (32 * BW) + tl.arange(0, 32 * BW)
    row_on = rows < n_rows
    bits = tl.load(mask_ptr + rows.to(tl.int64)[:, None] * d_in + cols[None, :],
                   mask=row_on[:, None] & (cols < d_in)[None, :], other=0)
    bits = tl.reshape((bits != 0).to(tl.int32), [BR, BW, 32]) << tl.arange(0, 32)[None, None, :]
    words = tl.reduce(bits, 2, _bit_or)
    tl.store(words_ptr + rows.to(tl.int64)[:, None] * n_words + wi[None, :], words,
             mask=row_on[:, None] & (wi < n_words)[None, :])


@triton.jit
def _unpack_kernel(words_ptr, mask_ptr, n_rows, d_in, n_words, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    on = (rows < n_rows)[:, None] & (cols < d_in)[None, :]
    w = tl.load(words_ptr + rows.to(tl.int64)[:, None] * n_words + (cols >> 5)[None, :], mask=on, other=0)
    bit = (w >> (cols & 31)[None, :]) & 1
    tl.store(mask_ptr + rows.to(tl.int64)[:, None] * d_in + cols[None, :], bit.to(tl.uint8), mask=on)


def pack_mask_triton(mask: torch.Tensor) -> torch.Tensor:
    """``[R, d_in]`` bool -> ``[R, ceil(d_in / 32)]`` int32."""
    n_rows, d_in = mask.shape
    n_words = (d_in + 31) // 32
    words = torch.empty(n_rows, n_words, dtype=torch.int32, device=mask.device)
    br, bw = 16, 4
    grid = (triton.cdiv(n_rows, br), triton.cdiv(n_words, bw))
    _pack_kernel[grid](mask.view(torch.uint8), words, n_rows, d_in, n_words, BR=br, BW=bw, num_warps=4)
    return words


def unpack_mask_triton(words: torch.Tensor, d_in: int) -> torch.Tensor:
    """``[R, ceil(d_in / 32)]`` int32 -> ``[R, d_in]`` bool."""
    n_rows, n_words = words.shape
    mask = torch.empty(n_rows, d_in, dtype=torch.bool, device=words.device)
    br, bc = 8, 256
    grid = (triton.cdiv(n_rows, br), triton.cdiv(d_in, bc))
    _unpack_kernel[grid](words, mask.view(torch.uint8), n_rows, d_in, n_words, BR=br, BC=bc, num_warps=4)
    return mask
