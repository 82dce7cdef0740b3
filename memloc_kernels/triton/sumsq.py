"""accumulate_sumsq: per-group, per-feature sums of squares of activations, deterministic."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config


@triton.jit
def _sumsq_kernel(h_ptr, acc_ptr, part_ptr, d, group_size, rows_per_split, n_split,
                  BM: tl.constexpr, BN: tl.constexpr, DIRECT: tl.constexpr):
    """Program (group g, split p, feature block): sum of h**2 over its rows of group g.

    ``DIRECT``: add into ``acc[g]`` (one program per (g, block), so no race); otherwise store the
    partial in ``part[g, p]`` for :func:`_sumsq_finish_kernel`.
    """
    gp = tl.program_id(0)
    g = gp // n_split
    p = gp % n_split
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_on = cols < d
    r0 = p * rows_per_split
    r1 = tl.minimum(r0 + rows_per_split, group_size)
    base = h_ptr + g.to(tl.int64) * group_size * d
    rr = tl.arange(0, BM)
    acc_ty = acc_ptr.dtype.element_ty
    total = tl.zeros([BM, BN], dtype=acc_ty)
    for r in range(r0, r1, BM):
        rows = r + rr
        x = tl.load(base + rows.to(tl.int64)[:, None] * d + cols[None, :],
                    mask=(rows < r1)[:, None] & col_on[None, :], other=0.0).to(acc_ty)
        total += x * x
    s = tl.sum(total, axis=0)
    if DIRECT:
        dst = acc_ptr + g.to(tl.int64) * d + cols
        tl.store(dst, tl.load(dst, mask=col_on) + s, mask=col_on)
    else:
        tl.store(part_ptr + gp.to(tl.int64) * d + cols, s, mask=col_on)


@triton.jit
def _sumsq_finish_kernel(acc_ptr, part_ptr, d, n_split, BN: tl.constexpr):
    """``acc[g] += sum_p part[g, p]`` in a fixed order (deterministic)."""
    g = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    on = cols < d
    s = tl.zeros([BN], dtype=acc_ptr.dtype.element_ty)
    for p in range(0, n_split):
        s += tl.load(part_ptr + (g * n_split + p) * d + cols, mask=on, other=0.0)
    dst = acc_ptr + g * d + cols
    tl.store(dst, tl.load(dst, mask=on) + s, mask=on)


def finish(acc: torch.Tensor, part: torch.Tensor | None, block_n: int) -> None:
    """Second stage of the two-stage reduction (no-op when every group had one split)."""
    if part is None:
        return
    groups, d = acc.shape
    _sumsq_finish_kernel[(groups, triton.cdiv(d, block_n))](acc, part, d, part.shape[0] // groups, BN=block_n)


def split_rows(group_size: int, groups: int, d: int, acc: torch.Tensor, cfg) -> tuple:
    """How a group's rows are split over programs: ``(rows_per_split, split, part)``.

    ``rows_per_split`` is a multiple of the row block; ``part`` is the ``[groups * split, d]``
    buffer of partial sums for :func:`finish`, or None when one program covers a whole group.
    """
    rows_per_split = -(-group_size // cfg.split)
    rows_per_split = -(-rows_per_split // cfg.block_m) * cfg.block_m
    split = -(-group_size // rows_per_split)
    part = None if split == 1 else torch.empty(groups * split, d, dtype=acc.dtype, device=acc.device)
    return rows_per_split, split, part


def accumulate_sumsq_triton(h: torch.Tensor, acc: torch.Tensor, group_size: int) -> None:
    """``acc[g, j] += sum_{rows r of group g} h[r, j]**2`` (canonical backend signature).

    Args:
        h: ``[rows, d]`` float16/bfloat16/float32/float64, contiguous; squared in ``acc``'s dtype.
        acc: ``[G, d]`` float32 or float64 with ``G * group_size == rows``, updated in place.
        group_size: consecutive rows per group.

    Deterministic: a program owns (group, row split, feature block); with several splits per
    group the partial sums go through a second kernel that adds them in a fixed order (two-stage,
    no atomics), so the result does not change from run to run.
    """
    rows, d = h.shape
    groups = acc.shape[0]
    cfg = _config.stats_config(rows, d, groups, h.device)
    rows_per_split, split, part = split_rows(group_size, groups, d, acc, cfg)
    grid = (groups * split, triton.cdiv(d, cfg.block_n))
    _sumsq_kernel[grid](h, acc, part if part is not None else acc, d, group_size, rows_per_split, split,
                        BM=cfg.block_m, BN=cfg.block_n, DIRECT=part is None, num_warps=cfg.num_warps)
    finish(acc, part, cfg.block_n)
