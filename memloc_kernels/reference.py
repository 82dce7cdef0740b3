"""Plain-PyTorch reference of every op: the oracle of the tests and the baseline of the benchmarks.

It is written to read like the paper (Chavhan et al., "Memorization is Localized within a Small
Subspace in Diffusion Models"); equation numbers refer to it. No function here is tuned for
speed beyond using ``torch.topk`` instead of a full sort, as the issue that created it asks.

Conventions shared with every backend (see ``memloc_kernels.ops`` for the validated API):

* ``weight`` is ``W`` of shape ``[d_out, d_in]``: the second linear layer of a feed-forward block.
* ``sumsq[..., j]`` is ``sum over prompts and latent tokens of h_j**2`` for the layer's input ``h``.
* Scores are float32: ``S_ij = |float32(W_ij)| * sqrt(float32(sumsq_j))`` with IEEE sqrt (eq. 2/4).
* Top-k ties: among equal scores, the lower column index is selected first.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "topk_count",
    "accumulate_sumsq",
    "geglu",
    "geglu_sumsq",
    "wanda_scores",
    "feature_norms",
    "topk_row_mask",
    "memorized_mask",
    "memorized_mask_topk",
    "union_over_timesteps",
    "pack_mask",
    "unpack_mask",
    "apply_mask",
    "restore",
    "mask_density",
    "mask_iou",
]

# floor(s * d_in) is computed with this slack so that, e.g., s = 0.29, d_in = 100 gives 29 and not
# 28 because 0.29 * 100 == 28.999999999999996 in binary floating point.
_K_EPS = 1e-9


def topk_count(sparsity: float, d_in: int) -> int:
    """Number of columns selected per row by eq. 5: ``k = max(1, floor(sparsity * d_in))``."""
    return max(1, min(d_in, math.floor(sparsity * d_in + _K_EPS)))


def accumulate_sumsq(h: torch.Tensor, acc: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """``acc[j] += sum_rows h[row, j]**2`` (or per group of ``group_size`` consecutive rows).

    ``h`` is viewed as ``[rows, d_in]``. The squares are taken in ``acc``'s dtype (float32 or
    float64) from ``h`` as stored, so a float16 activation is squared exactly as the next linear
    layer consumes it.
    """
    d_in = h.shape[-1]
    x = h.reshape(-1, d_in).to(acc.dtype)
    if group_size is None:
        acc += x.square().sum(dim=0)
    else:
        acc += x.square().reshape(-1, group_size, d_in).sum(dim=1)
    return acc


def geglu(proj_out: torch.Tensor) -> torch.Tensor:
    """diffusers' GEGLU: ``hidden, gate = proj_out.chunk(2, -1); hidden * gelu(gate)`` (erf form).

    Rounded to ``proj_out.dtype`` after the GELU and after the product, as diffusers computes it.
    """
    hidden, gate = proj_out.chunk(2, dim=-1)
    return hidden * torch.nn.functional.gelu(gate)


def geglu_sumsq(proj_out: torch.Tensor, acc: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """GEGLU followed by :func:`accumulate_sumsq` of its (rounded) output; returns the output."""
    h = geglu(proj_out)
    accumulate_sumsq(h, acc, group_size)
    return h


def wanda_scores(weight: torch.Tensor, sumsq: torch.Tensor) -> torch.Tensor:
    """Eq. 2/4 (Wanda): ``S_ij = |W_ij| * ||X_j||_2`` with ``||X_j||_2 = sqrt(sumsq_j)``.

    ``sumsq`` of shape ``[d_in]`` gives ``[d_out, d_in]``; ``[..., d_in]`` gives ``[..., d_out, d_in]``.
    """
    return weight.to(torch.float32).abs() * feature_norms(sumsq).unsqueeze(-2)


def feature_norms(sumsq: torch.Tensor) -> torch.Tensor:
    """``||X_j||_2 = sqrt(float32(sumsq_j))``, correctly rounded (IEEE) on every device.

    torch's CPU float32 sqrt is not always correctly rounded; the square root of a float32 taken
    in float64 and rounded back to float32 is, so that route gives the same bits everywhere.
    """
    return torch.sqrt(sumsq.to(torch.float32).to(torch.float64)).to(torch.float32)


def topk_row_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 5: boolean mask of the ``k`` largest entries of each row (last dim).

    Ties at the k-th value are broken towards the lower column index: every score strictly above
    the k-th largest value is selected, then equal scores from the left until ``k`` are selected.
    """
    kth = torch.topk(scores, k, dim=-1, largest=True, sorted=True).values[..., -1:]
    above = scores > kth
    equal = scores == kth
    still_needed = k - above.sum(dim=-1, keepdim=True)
    rank_among_equal = torch.cumsum(equal.to(torch.int32), dim=-1)
    return above | (equal & (rank_among_equal <= still_needed))


def memorized_mask(
    weight: torch.Tensor, sumsq: torch.Tensor, null_sumsq: torch.Tensor, sparsity: float
) -> torch.Tensor:
    """Eq. 5 + 6: weights in their row's top-k by ``S(P)`` and with ``S(P) > S(P_null)``.

    Shapes: ``sumsq`` ``[d_in]`` gives ``[d_out, d_in]``; ``[S, d_in]`` gives ``[S, d_out, d_in]``;
    ``[S, T, d_in]`` gives ``[S, d_out, d_in]``, the union over the T axis (eq. 7, where T indexes
    the first tau+1 timesteps). ``null_sumsq`` has the shape of ``sumsq`` or ``[d_in]``.
    """
    return memorized_mask_topk(weight, sumsq, null_sumsq, topk_count(sparsity, weight.shape[1]))


def memorized_mask_topk(
    weight: torch.Tensor, sumsq: torch.Tensor, null_sumsq: torch.Tensor, k: int
) -> torch.Tensor:
    """:func:`memorized_mask` with the per-row count ``k`` of eq. 5 given directly."""
    scores = wanda_scores(weight, sumsq)  # eq. 2/4 for P
    null_scores = wanda_scores(weight, null_sumsq.expand_as(sumsq))  # eq. 2/4 for P_null
    mask = topk_row_mask(scores, k) & (scores > null_scores)  # eq. 5 and 6
    if sumsq.dim() == 3:
        mask = union_over_timesteps(mask.transpose(0, 1))  # eq. 7
    return mask


def union_over_timesteps(masks: torch.Tensor) -> torch.Tensor:
    """Eq. 7: a weight is pruned if it is memorized at any of the given timesteps (dim 0)."""
    return masks.any(dim=0)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack the last dim: bit ``j % 32`` of int32 word ``j // 32`` holds ``mask[..., j]``."""
    d_in = mask.shape[-1]
    n_words = (d_in + 31) // 32
    padded = torch.zeros(*mask.shape[:-1], n_words * 32, dtype=torch.int64, device=mask.device)
    padded[..., :d_in] = mask.to(torch.int64)
    bits = padded.reshape(*mask.shape[:-1], n_words, 32)
    weights = torch.ones(32, dtype=torch.int64, device=mask.device) << torch.arange(32, device=mask.device)
    words = (bits * weights).sum(dim=-1)
    # reinterpret the low 32 bits as a signed int32 (bit 31 set -> negative)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_mask(words: torch.Tensor, d_in: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: ``[..., ceil(d_in / 32)]`` int32 words to ``[..., d_in]`` bool."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int64)
    bits = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*words.shape[:-1], -1)[..., :d_in].bool()


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 7's pruning: zero ``weight`` where ``mask`` is set, in place.

    Returns the removed values in row-major order (``weight[mask]`` before zeroing), from which
    :func:`restore` puts back the exact bits.
    """
    removed = weight[mask].clone()
    weight.masked_fill_(mask, 0)
    return removed


def restore(weight: torch.Tensor, mask: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Undo :func:`apply_mask`: write ``removed`` back where ``mask`` is set, in place.

    The values are written as integers of their width: a float copy may quiet a signalling NaN.
    """
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[weight.element_size()]
    weight.view(bits)[mask] = removed.view(bits)
    return weight


def mask_density(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of set entries over the last two dims (``[..., d_out, d_in]`` gives ``[...]``), float64.

    The exact count divided once (correctly rounded): ``mean`` may round differently per device.
    """
    count = mask.sum(dim=(-2, -1), dtype=torch.float64)  # integers below 2**53: exact
    return count / (mask.shape[-2] * mask.shape[-1])


def mask_iou(masks: torch.Tensor, empty_value: float = float("nan")) -> torch.Tensor:
    """Pairwise intersection over union of N masks ``[N, ...]`` (each flattened): ``[N, N]`` float64.

    The IoU of two empty masks is 0/0; it is reported as ``empty_value`` (NaN by default, so that
    averages over pairs can skip it with ``nanmean``).
    """
    flat = masks.reshape(masks.shape[0], -1).to(torch.float64)
    inter = flat @ flat.T
    sizes = flat.sum(dim=1)
    union = sizes[:, None] + sizes[None, :] - inter
    iou = inter / union.clamp(min=1)
    return torch.where(union == 0, torch.full_like(iou, empty_value), iou)
