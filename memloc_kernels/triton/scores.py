"""wanda_scores: |W| * sqrt(sumsq) in float32 for S statistics vectors (eq. 2/4)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import feature_norms


@triton.jit
def _wanda_scores_kernel(w_ptr, norm_ptr, out_ptr, d_out, d_in, BR: tl.constexpr, BC: tl.constexpr):
    """``out[s, rows, cols] = |float32(W[rows, cols])| * norm[s, cols]``."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    s = tl.program_id(2).to(tl.int64)
    on = (rows < d_out)[:, None] & (cols < d_in)[None, :]
    offs = rows.to(tl.int64)[:, None] * d_in + cols[None, :]
    w = tl.load(w_ptr + offs, mask=on, other=0.0)
    n = tl.load(norm_ptr + s * d_in + cols, mask=cols < d_in, other=0.0)
    tl.store(out_ptr + s * d_out * d_in + offs, tl.abs(w.to(tl.float32)) * n[None, :], mask=on)


def wanda_scores_triton(weight: torch.Tensor, sumsq: torch.Tensor) -> torch.Tensor:
    """Scores ``[S, d_out, d_in]`` float32 of ``weight`` ``[d_out, d_in]`` for ``sumsq`` ``[S, d_in]`` float32.

    ``sqrt(sumsq)`` is taken by ``reference.feature_norms`` (IEEE), so the scores equal the reference's bits.
    """
    d_out, d_in = weight.shape
    norms = feature_norms(sumsq)
    out = torch.empty(sumsq.shape[0], d_out, d_in, dtype=torch.float32, device=weight.device)
    br, bc = 16, 128
    grid = (triton.cdiv(d_out, br), triton.cdiv(d_in, bc), sumsq.shape[0])
    _wanda_scores_kernel[grid](weight, norms, out, d_out, d_in, BR=br, BC=bc, num_warps=4)
    return out
