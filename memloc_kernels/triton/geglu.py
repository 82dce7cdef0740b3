"""geglu_sumsq: diffusers' GEGLU fused with the sums of squares of its rounded output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config
from .sumsq import finish, split_rows


@triton.jit
def _to_bf16_rne(x):
    """float32 -> bfloat16 rounded to nearest even, as torch does (NaN -> 0x7FC0).

    Used under the interpreter only, whose conversion truncates; on the GPU ``.to`` rounds to
    nearest even natively.
    """
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _round(x, io_ty: tl.constexpr, RNE_BF16: tl.constexpr):
    if RNE_BF16 and io_ty == tl.bfloat16:
        return _to_bf16_rne(x)
    else:
        return x.to(io_ty)


@triton.jit
def _geglu_sumsq_kernel(p_ptr, a_ptr, h_ptr, acc_ptr, part_ptr, d, group_size, rows_per_split, n_split,
                        BM: tl.constexpr, BN: tl.constexpr, DIRECT: tl.constexpr, RNE_BF16: tl.constexpr):
    """Program (group g, split p, feature block): h = hidden * act for its rows (act = torch's
    gelu(gate), already rounded), stored, and the sum of h**2 (h as rounded to the activation
    dtype) into ``acc[g]`` or ``part[g, p]``."""
    gp = tl.program_id(0)
    g = gp // n_split
    p = gp % n_split
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_on = cols < d
    r0 = p * rows_per_split
    r1 = tl.minimum(r0 + rows_per_split, group_size)
    row0 = g.to(tl.int64) * group_size
    rr = tl.arange(0, BM)
    acc_ty = acc_ptr.dtype.element_ty
    io_ty = h_ptr.dtype.element_ty
    total = tl.zeros([BM, BN], dtype=acc_ty)
    for r in range(r0, r1, BM):
        rows = row0 + r + rr
        on = (r + rr < r1)[:, None] & col_on[None, :]
        src = p_ptr + rows[:, None] * (2 * d) + cols[None, :]
        hidden = tl.load(src, mask=on, other=0.0)
        act = tl.load(a_ptr + rows[:, None] * d + cols[None, :], mask=on, other=0.0)
        if io_ty == tl.float64:
            h = hidden * act
        else:
            # diffusers multiplies in float32 (opmath) and rounds to the activation dtype
            h = _round(hidden.to(tl.float32) * act.to(tl.float32), io_ty, RNE_BF16)
        tl.store(h_ptr + rows[:, None] * d + cols[None, :], h, mask=on)
        x = h.to(acc_ty)
        total += x * x
    s = tl.sum(total, axis=0)
    if DIRECT:
        dst = acc_ptr + g.to(tl.int64) * d + cols
        tl.store(dst, tl.load(dst, mask=col_on) + s, mask=col_on)
    else:
        tl.store(part_ptr + gp.to(tl.int64) * d + cols, s, mask=col_on)


def geglu_sumsq_triton(proj_out: torch.Tensor, acc: torch.Tensor, group_size: int) -> torch.Tensor:
    """diffusers' GEGLU of ``proj_out`` and, in the same pass, its sums of squares into ``acc``.

    Args:
        proj_out: ``[rows, 2 * d]`` (hidden half, then gate half), contiguous, any float dtype.
        acc: ``[G, d]`` float32/float64, ``G * group_size == rows``, updated in place.
        group_size: consecutive rows per group (one sample's tokens).
    Returns:
        ``h`` ``[rows, d]`` in ``proj_out.dtype``, bit-identical to diffusers' GEGLU.

    The GELU itself is torch's ``F.gelu`` (what diffusers calls), so its erf and rounding are
    the same bits by construction: an in-kernel erf (libdevice) differed from torch's CUDA GELU
    in about 0.5-0.9 % of fp16/bf16 outputs on an H200. The product, its rounding and the sums
    of squares are fused into one kernel, so the pass count equals diffusers' plain GEGLU (one
    GELU kernel, one multiply kernel).

    Deterministic (two-stage reduction, no atomics), like :func:`accumulate_sumsq_triton`.
    """
    rows, d2 = proj_out.shape
    d = d2 // 2
    groups = acc.shape[0]
    act = torch.nn.functional.gelu(proj_out[:, d:])
    h = torch.empty(rows, d, dtype=proj_out.dtype, device=proj_out.device)
    cfg = _config.stats_config(rows, d, groups, proj_out.device)
    rows_per_split, split, part = split_rows(group_size, groups, d, acc, cfg)
    grid = (groups * split, triton.cdiv(d, cfg.block_n))
    _geglu_sumsq_kernel[grid](proj_out, act.contiguous(), h, acc, part if part is not None else acc, d, group_size,
                              rows_per_split, split, BM=cfg.block_m, BN=cfg.block_n, DIRECT=part is None,
                              RNE_BF16=not proj_out.is_cuda, num_warps=cfg.num_warps)
    finish(acc, part, cfg.block_n)
    return h
