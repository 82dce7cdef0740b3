"""The public ops API: validate at the boundary, canonicalize, dispatch to a backend.

Every function takes ``backend="auto"`` (see ``memloc_kernels._dispatch`` for the rule) or one of
``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch.autograd.graph import increment_version

from . import _validate as v
from . import reference as _ref
from ._dispatch import select, select_memorized_mask
from .types import PackedMask, PruneRecord, n_words

__all__ = [
    "accumulate_sumsq",
    "geglu_sumsq",
    "wanda_scores",
    "memorized_mask",
    "memorized_masks",
    "pack_mask",
    "unpack_mask",
    "apply_mask",
    "restore",
    "mask_density",
    "mask_iou",
    "topk_count",
]


def topk_count(sparsity: float, d_in: int) -> int:
    """Number of columns selected per row by eq. 5: ``k = max(1, floor(sparsity * d_in))``."""
    return _ref.topk_count(v.sparsity(sparsity), v.positive_int("d_in", d_in))


def _groups(rows: int, d_in: int, acc: torch.Tensor, group_size: int | None) -> tuple[int, int]:
    """Checks ``acc`` against ``rows`` and ``group_size``; returns ``(groups, group_size)``."""
    if group_size is None:
        if tuple(acc.shape) != (d_in,):
            raise ValueError(f"acc must have shape [{d_in}] without group_size, got {tuple(acc.shape)}")
        return 1, rows
    group_size = v.positive_int("group_size", group_size)
    if rows % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {rows} rows of h")
    groups = rows // group_size
    if tuple(acc.shape) != (groups, d_in):
        raise ValueError(
            f"acc must have shape [{groups}, {d_in}] ({rows} rows / group_size {group_size}), got {tuple(acc.shape)}"
        )
    return groups, group_size


def accumulate_sumsq(
    h: torch.Tensor, acc: torch.Tensor, *, group_size: int | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Add the per-feature sums of squares of ``h`` into ``acc``, in place; returns ``acc``.

    Args:
        h: activations ``[..., d_in]`` (float16, bfloat16, float32 or float64), viewed as
            ``[rows, d_in]``; must be contiguous.
        acc: float32 or float64 accumulators: ``[d_in]`` (sum over all rows) or, with
            ``group_size=g``, ``[rows // g, d_in]`` where group ``i`` sums rows ``i*g .. i*g+g-1``
            (one sample's latent tokens).
        group_size: rows per group, or None for a single sum.
    """
    v.float_tensor("h", h)
    v.accumulator("acc", acc)
    v.same_device(h=h, acc=acc)
    if h.dim() < 1 or h.shape[-1] == 0:
        raise ValueError(f"h must have a non-empty last (feature) dim, got shape {tuple(h.shape)}")
    d_in = h.shape[-1]
    h2 = h.reshape(-1, d_in)
    groups, group_size = _groups(h2.shape[0], d_in, acc, group_size)
    if h2.shape[0] == 0:
        return acc
    impl = select("accumulate_sumsq", backend, h.device)
    impl.accumulate_sumsq(h2, acc.view(groups, d_in), group_size)
    return acc


def geglu_sumsq(
    proj_out: torch.Tensor, acc: torch.Tensor, *, group_size: int | None = None, backend: str = "auto"
) -> torch.Tensor:
    """diffusers' GEGLU fused with :func:`accumulate_sumsq` of its output.

    ``hidden, gate = proj_out.chunk(2, -1); h = hidden * gelu(gate)`` (erf GELU), rounded to
    ``proj_out.dtype`` as diffusers rounds it; ``acc`` (``[d_ff]`` or ``[groups, d_ff]``) gets the
    sums of squares of that rounded ``h``, which is what the second linear layer consumes.
    Returns ``h`` of shape ``[..., d_ff]``.
    """
    v.float_tensor("proj_out", proj_out)
    v.accumulator("acc", acc)
    v.same_device(proj_out=proj_out, acc=acc)
    if proj_out.dim() < 1 or proj_out.shape[-1] % 2 or proj_out.shape[-1] == 0:
        raise ValueError(
            f"proj_out's last dim must be even and non-zero (hidden and gate halves), got {tuple(proj_out.shape)}"
        )
    d_ff = proj_out.shape[-1] // 2
    p2 = proj_out.reshape(-1, 2 * d_ff)
    groups, group_size = _groups(p2.shape[0], d_ff, acc, group_size)
    if p2.shape[0] == 0:
        return proj_out.new_empty(*proj_out.shape[:-1], d_ff)
    impl = select("geglu_sumsq", backend, proj_out.device)
    h = impl.geglu_sumsq(p2, acc.view(groups, d_ff), group_size)
    return h.view(*proj_out.shape[:-1], d_ff)


def wanda_scores(weight: torch.Tensor, sumsq: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Eq. 2/4: ``S_ij = |W_ij| * sqrt(sumsq_j)`` in float32.

    ``weight`` ``[d_out, d_in]``; ``sumsq`` ``[d_in]`` gives ``[d_out, d_in]``, ``[S, d_in]`` gives
    ``[S, d_out, d_in]``.
    """
    v.weight("weight", weight)
    d_in = weight.shape[1]
    v.same_device(weight=weight, sumsq=sumsq)
    v.sumsq("sumsq", sumsq, d_in, max_dims=2)
    s2 = sumsq.reshape(-1, d_in).to(torch.float32).contiguous()
    impl = select("wanda_scores", backend, weight.device)
    scores = impl.wanda_scores(weight, s2)
    return scores[0] if sumsq.dim() == 1 else scores


def _canonical_stats(name: str, null_name: str, sumsq, null_sumsq, d_in: int, check_finite: bool):
    """sumsq/null_sumsq as float32 ``[S, T, d_in]`` pairs, plus the output's leading shape."""
    v.sumsq(name, sumsq, d_in, max_dims=3, check_finite=check_finite)
    v.sumsq(null_name, null_sumsq, d_in, max_dims=3, check_finite=check_finite)
    if null_sumsq.shape != sumsq.shape and null_sumsq.dim() != 1:
        raise ValueError(
            f"{null_name} must have the shape of {name} {tuple(sumsq.shape)} or [{d_in}], got {tuple(null_sumsq.shape)}"
        )
    lead = () if sumsq.dim() == 1 else (sumsq.shape[0],)
    s3 = sumsq.to(torch.float32).reshape(-1 if sumsq.dim() > 1 else 1, sumsq.shape[1] if sumsq.dim() == 3 else 1, d_in)
    n3 = null_sumsq.to(torch.float32).expand(sumsq.shape).reshape(s3.shape)
    return s3.contiguous(), n3.contiguous(), lead


def memorized_mask(
    weight: torch.Tensor,
    sumsq: torch.Tensor,
    null_sumsq: torch.Tensor,
    sparsity: float,
    *,
    packed: bool = False,
    out: torch.Tensor | PackedMask | None = None,
    check_finite: bool = True,
    backend: str = "auto",
) -> torch.Tensor | PackedMask:
    """Eq. 5 + 6 (and eq. 7's union): the memorized weights of one layer.

    A weight is memorized iff its score ``|W_ij| sqrt(sumsq_j)`` is among the
    ``k = max(1, floor(sparsity * d_in))`` largest of its row (ties: the lower column index wins)
    AND it is strictly greater than its null score ``|W_ij| sqrt(null_sumsq_j)``.

    Args:
        weight: ``[d_out, d_in]`` float16, bfloat16 or float32, contiguous.
        sumsq: ``[d_in]``, ``[S, d_in]`` (S independent masks: subsets or timesteps) or
            ``[S, T, d_in]`` (the union over T, eq. 7); non-negative and finite.
        null_sumsq: the same shape as ``sumsq``, or ``[d_in]`` for one null shared by all.
        sparsity: ``s`` in ``(0, 1]``.
        packed: return a :class:`PackedMask` instead of a bool tensor.
        out: an existing mask (bool tensor, or PackedMask when ``packed``) of the result's shape
            into which the result is OR-ed in place and which is returned (a PackedMask's bits
            past ``d_in`` must be zero: they are not checked here, to keep this call sync-free).
        check_finite: check ``sumsq`` and ``null_sumsq`` for NaN/inf/negative values and ``weight``
            for NaN/inf (a few device syncs and one read of ``weight``). Masks of inputs that fail
            these checks are not defined: backends may differ on them.
    Returns:
        ``[d_out, d_in]`` for 1-D ``sumsq``, else ``[S, d_out, d_in]`` (bool, or packed).
    """
    v.weight("weight", weight)
    d_out, d_in = weight.shape
    sparsity = v.sparsity(sparsity)
    v.same_device(weight=weight, sumsq=sumsq, null_sumsq=null_sumsq)
    s3, n3, lead = _canonical_stats("sumsq", "null_sumsq", sumsq, null_sumsq, d_in, check_finite)
    if check_finite:
        v.finite_weight("weight", weight)
    k = topk_count(sparsity, d_in)
    shape = (*lead, d_out, d_in)
    words = _output_words(out, packed, shape, weight.device)
    impl = select_memorized_mask(backend, weight.device, [(d_in, k)])
    impl.memorized_mask(weight, s3, n3, k, words.view(s3.shape[0], d_out, n_words(d_in)))
    return _deliver(words, out, packed, d_in, impl)


def memorized_masks(
    weights: Sequence[torch.Tensor],
    sumsqs: Sequence[torch.Tensor],
    null_sumsqs: Sequence[torch.Tensor],
    sparsity: float,
    *,
    outs: Sequence[PackedMask] | None = None,
    check_finite: bool = True,
    backend: str = "auto",
) -> list[PackedMask]:
    """:func:`memorized_mask` for several layers at once (packed), e.g. all FFNs of a UNet.

    Backends that fuse layers into few launches do so here; the result equals one
    :func:`memorized_mask` call per layer.
    """
    if not (len(weights) == len(sumsqs) == len(null_sumsqs)) or (outs is not None and len(outs) != len(weights)):
        raise ValueError("weights, sumsqs, null_sumsqs (and outs) must have the same length")
    sparsity = v.sparsity(sparsity)
    if len(weights) == 0:
        return []
    device = weights[0].device
    ws, s3s, n3s, ks, words, views = [], [], [], [], [], []
    for i, (w, s, n) in enumerate(zip(weights, sumsqs, null_sumsqs)):
        v.weight(f"weights[{i}]", w)
        v.same_device(**{"weights[0]": weights[0], f"weights[{i}]": w, f"sumsqs[{i}]": s, f"null_sumsqs[{i}]": n})
        d_out, d_in = w.shape
        s3, n3, lead = _canonical_stats(f"sumsqs[{i}]", f"null_sumsqs[{i}]", s, n, d_in, check_finite)
        if check_finite:
            v.finite_weight(f"weights[{i}]", w)
        out_words = _output_words(None if outs is None else outs[i], True, (*lead, d_out, d_in), device)
        ws.append(w)
        s3s.append(s3)
        n3s.append(n3)
        ks.append(topk_count(sparsity, d_in))
        words.append(out_words)
        views.append(out_words.view(s3.shape[0], d_out, n_words(d_in)))
    impl = select_memorized_mask(backend, device, [(w.shape[1], k) for w, k in zip(ws, ks)])
    if hasattr(impl, "memorized_mask_multi"):
        impl.memorized_mask_multi(ws, s3s, n3s, ks, views)
    else:
        for w, s3, n3, k, view in zip(ws, s3s, n3s, ks, views):
            impl.memorized_mask(w, s3, n3, k, view)
    return [
        _deliver(wd, None if outs is None else outs[i], True, ws[i].shape[1], impl) for i, wd in enumerate(words)
    ]


def _output_words(out, packed: bool, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The int32 words the backend ORs into: ``out``'s own (packed), a packed copy, or zeros."""
    d_in = shape[-1]
    wshape = (*shape[:-1], n_words(d_in))
    if out is None:
        return torch.zeros(wshape, dtype=torch.int32, device=device)
    if packed:
        if not isinstance(out, PackedMask):
            raise TypeError(f"out must be a PackedMask when packed=True, got {type(out).__name__}")
        if out.shape != shape:
            raise ValueError(f"out must have shape {list(shape)}, got {list(out.shape)}")
        if out.device != device:
            raise ValueError(f"out is on {out.device}, expected {device}")
        if not out.words.is_contiguous():
            raise ValueError("out.words must be contiguous")
        return out.words
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
        raise TypeError(f"out must be a bool tensor when packed=False, got {getattr(out, 'dtype', type(out).__name__)}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {list(shape)}, got {list(out.shape)}")
    if out.device != device:
        raise ValueError(f"out is on {out.device}, expected {device}")
    return _pack(out.reshape(-1, d_in), select("pack_mask", "auto", device)).reshape(wshape)


def _deliver(words: torch.Tensor, out, packed: bool, d_in: int, impl) -> torch.Tensor | PackedMask:
    if packed:
        return out if out is not None else PackedMask(words, d_in)
    mask = _unpack(words.reshape(-1, words.shape[-1]), d_in, select("unpack_mask", "auto", words.device))
    mask = mask.reshape(*words.shape[:-1], d_in)
    if out is not None:
        out.copy_(mask)
        return out
    return mask


def _pack(mask2d: torch.Tensor, impl) -> torch.Tensor:
    if mask2d.shape[0] == 0:
        return torch.zeros(0, n_words(mask2d.shape[1]), dtype=torch.int32, device=mask2d.device)
    return impl.pack_mask(mask2d.contiguous())


def _unpack(words2d: torch.Tensor, d_in: int, impl) -> torch.Tensor:
    if words2d.shape[0] == 0:
        return torch.zeros(0, d_in, dtype=torch.bool, device=words2d.device)
    return impl.unpack_mask(words2d.contiguous(), d_in)


def pack_mask(mask: torch.Tensor, *, backend: str = "auto") -> PackedMask:
    """Bit-pack a bool mask ``[..., d_in]`` into a :class:`PackedMask` (int32 words, LSB first)."""
    v.bool_mask("mask", mask)
    d_in = mask.shape[-1]
    words = _pack(mask.reshape(-1, d_in), select("pack_mask", backend, mask.device))
    return PackedMask(words.reshape(*mask.shape[:-1], n_words(d_in)), d_in)


def unpack_mask(mask: PackedMask, *, backend: str = "auto") -> torch.Tensor:
    """The bool tensor ``[..., d_in]`` that a :class:`PackedMask` holds."""
    if not isinstance(mask, PackedMask):
        raise TypeError(f"mask must be a PackedMask, got {type(mask).__name__}")
    words = mask.words.contiguous()
    bits = _unpack(words.reshape(-1, words.shape[-1]), mask.d_in, select("unpack_mask", backend, words.device))
    return bits.reshape(mask.shape)


def _as_words(name: str, mask, shape: tuple[int, int], device, backend: str) -> PackedMask:
    """A bool or packed ``[d_out, d_in]`` mask as a PackedMask, checked against the weight."""
    if isinstance(mask, PackedMask):
        if mask.shape != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"{name} is on {mask.device}, expected {device} (the weight's device)")
        mask.check_padding(name)
        return PackedMask(mask.words.contiguous(), mask.d_in)
    v.bool_mask(name, mask)
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, expected {device} (the weight's device)")
    return pack_mask(mask, backend=backend)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor | PackedMask, *, backend: str = "auto") -> PruneRecord:
    """Eq. 7's pruning: zero ``weight`` where ``mask`` is set, in place.

    Returns a :class:`PruneRecord` holding the packed mask and the removed values, from which
    :func:`restore` puts back the exact original bits.
    """
    v.weight("weight", weight, allow_float64=True)
    v.not_requiring_grad("weight", weight)
    packed = _as_words("mask", mask, tuple(weight.shape), weight.device, backend)
    impl = select("apply_mask", backend, weight.device)
    removed = impl.apply_mask(weight, packed.words)
    increment_version(weight)  # as torch's own in-place ops do, so autograd sees the change
    return PruneRecord(packed, removed, tuple(weight.shape), weight.dtype)


def restore(weight: torch.Tensor, record: PruneRecord, *, backend: str = "auto") -> torch.Tensor:
    """Exact undo of :func:`apply_mask` on the same weight tensor; returns ``weight``."""
    if not isinstance(record, PruneRecord):
        raise TypeError(f"record must be a PruneRecord, got {type(record).__name__}")
    v.weight("weight", weight, allow_float64=True)
    v.not_requiring_grad("weight", weight)
    if tuple(weight.shape) != record.shape or weight.dtype != record.dtype:
        raise ValueError(
            f"record is for a {list(record.shape)} {record.dtype} weight, got {list(weight.shape)} {weight.dtype}"
        )
    words, removed = record.mask.words, record.removed
    if record.mask.shape != tuple(weight.shape):
        raise ValueError(f"record.mask must have shape {list(weight.shape)}, got {list(record.mask.shape)}")
    if words.device != weight.device or removed.device != weight.device:
        raise ValueError(f"record is on {words.device}, expected {weight.device} (the weight's device)")
    if not isinstance(removed, torch.Tensor) or removed.dtype != weight.dtype or removed.dim() != 1:
        got = f"{removed.dtype} of shape {tuple(removed.shape)}" if isinstance(removed, torch.Tensor) else type(removed)
        raise ValueError(f"record.removed must be a 1-D {weight.dtype} tensor, got {got}")
    words = words.contiguous()
    record.mask.check_padding("record.mask")
    selected = int(select("mask_popcount", backend, weight.device).mask_popcount(words).sum())
    if removed.numel() != selected:
        raise ValueError(f"record.removed holds {removed.numel()} values but record.mask selects {selected}")
    impl = select("restore", backend, weight.device)
    impl.restore(weight, words, removed.contiguous())
    increment_version(weight)
    return weight


def _words2d(name: str, masks, backend: str, batched: bool) -> tuple[torch.Tensor, int]:
    """Masks as int32 words ``[N, W]`` plus the number of mask elements per row of that view."""
    if isinstance(masks, PackedMask):
        words, d_in = masks.words.contiguous(), masks.d_in
        masks.check_padding(name)
    else:
        v.bool_mask(name, masks)
        packed = pack_mask(masks, backend=backend)
        words, d_in = packed.words, packed.d_in
    shape = (*words.shape[:-1], d_in)  # the mask's
    if batched:
        if words.dim() < 2:
            raise ValueError(f"{name} must have a leading mask dim N, got shape {shape}")
        return words.reshape(words.shape[0], math.prod(words.shape[1:])), math.prod(shape[1:])
    if words.dim() < 2:
        raise ValueError(f"{name} must have shape [..., d_out, d_in], got {shape}")
    return words.reshape(math.prod(words.shape[:-2]), words.shape[-2] * words.shape[-1]), words.shape[-2] * d_in


def mask_density(masks: torch.Tensor | PackedMask, *, backend: str = "auto") -> torch.Tensor:
    """Fraction of set entries over the last two dims: ``[..., d_out, d_in]`` gives ``[...]`` (float64)."""
    words, per_row = _words2d("masks", masks, backend, batched=False)
    lead = (masks.words.shape[:-2] if isinstance(masks, PackedMask) else masks.shape[:-2])
    if words.shape[0] == 0 or per_row == 0:
        return torch.full(tuple(lead), float("nan"), dtype=torch.float64, device=words.device)
    counts = select("mask_popcount", backend, words.device).mask_popcount(words)
    # a tensor divisor: CUDA divides by a Python scalar as a multiply by its reciprocal (1 ulp off)
    return (counts.to(torch.float64) / torch.full_like(counts, per_row, dtype=torch.float64)).reshape(tuple(lead))


def mask_iou(
    masks: torch.Tensor | PackedMask, *, empty_value: float = float("nan"), backend: str = "auto"
) -> torch.Tensor:
    """Pairwise IoU ``|A & B| / |A | B|`` of N masks ``[N, ...]`` (each flattened): ``[N, N]`` float64.

    Two empty masks have no defined IoU (0/0); their entry is ``empty_value`` (NaN by default, so
    that averages can skip such pairs with ``nanmean``).
    """
    if isinstance(empty_value, bool) or not isinstance(empty_value, numbers.Real):
        raise TypeError(f"empty_value must be a number, got {type(empty_value).__name__}")
    words, _ = _words2d("masks", masks, backend, batched=True)
    if words.shape[0] == 0:
        return torch.zeros(0, 0, dtype=torch.float64, device=words.device)
    if words.shape[1] == 0:  # masks of no elements: every pair is empty
        return torch.full((words.shape[0],) * 2, float(empty_value), dtype=torch.float64, device=words.device)
    impl = select("mask_intersections", backend, words.device)
    inter = impl.mask_intersections(words).to(torch.float64)
    sizes = torch.diagonal(inter)
    union = sizes[:, None] + sizes[None, :] - inter
    iou = inter / union.clamp(min=1)
    return torch.where(union == 0, torch.full_like(iou, empty_value), iou)
