"""Prune: zero a mask file's weights in a model in place (eq. 7), undo exactly, save the result."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import memloc_kernels as mk

from .errors import MemlocError
from .ffn import FFNLayer, check_identity, find_ffn_layers, identity
from .io import atomic_dir, check_apart
from .localize import MaskFile, read_mask_file, write_mask_file
from .pipeline import (
    denoiser_component,
    denoiser_of,
    load_denoiser,
    load_pipeline,
    quiet_libraries,
    read_model_index,
    resolve_model,
    stored_dtype,
)
from .stats import check_output, check_output_dir

MASK_IN_PIPELINE = "memloc_mask.safetensors"


def select_masks(mask: MaskFile, subset: int | None = None) -> list[mk.PackedMask]:
    """One ``[d_out, d_in]`` mask per layer: subset ``subset``, or the union over all subsets (None)."""
    n = mask.n_subsets
    if subset is not None:
        if not -n <= subset < n:
            raise MemlocError(f"--subset-index {subset} is outside the mask file's {n} subsets")
        return [mk.PackedMask(m.words[subset].contiguous(), m.d_in) for m in mask.masks]
    union = []
    for m in mask.masks:
        words = functools.reduce(torch.bitwise_or, list(m.words.unbind(0)))
        union.append(mk.PackedMask(words.contiguous(), m.d_in))
    return union


@dataclass
class Pruning:
    """Masks applied to a model; :meth:`undo` puts back the exact original weights."""

    layers: list[FFNLayer]
    records: list[mk.PruneRecord]
    backend: str = "auto"

    @property
    def count(self) -> int:
        return sum(record.count for record in self.records)

    @property
    def total(self) -> int:
        return sum(layer.d_in * layer.d_out for layer in self.layers)

    def undo(self) -> None:
        with torch.no_grad():
            for layer, record in zip(self.layers, self.records):
                mk.restore(layer.linear.weight.data, record, backend=self.backend)
        self.records = []


def apply_masks(
    denoiser: torch.nn.Module,
    mask: MaskFile,
    subset: int | None = None,
    backend: str = "auto",
    source: str | None = None,
) -> Pruning:
    """Apply a mask file to ``denoiser`` in place after checking that it was made for this model."""
    layers = find_ffn_layers(denoiser)
    check_identity(mask.meta["model"], identity(denoiser, layers, source), f"mask file {mask.path}")
    chosen = select_masks(mask, subset)
    records = []
    with torch.no_grad():
        for layer, m in zip(layers, chosen):
            weight = layer.linear.weight.data
            records.append(mk.apply_mask(weight, m.to(weight.device), backend=backend))
    return Pruning(layers, records, backend)


def prune(
    mask: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    mask_only: bool = False,
    subset: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    backend: str = "auto",
) -> Path:
    """Write the pruned pipeline folder ``out`` (or, with ``mask_only``, only its packed mask file).

    ``subset`` picks one subset of a multi-subset mask file; by default the union of all is pruned.
    The pipeline keeps its stored dtype unless ``dtype`` is given; the applied mask is saved beside
    it as ``memloc_mask.safetensors``.
    """
    loaded = read_mask_file(mask)
    chosen = select_masks(loaded, subset)
    single = [mk.PackedMask(m.words.unsqueeze(0), m.d_in) for m in chosen]
    check_apart(out, mask_file=mask, model=model)
    if mask_only:
        check_output(out)
        denoiser, source = load_denoiser(model, device or "cpu", dtype)
        check_identity(loaded.meta["model"], identity(denoiser, find_ffn_layers(denoiser), source), f"mask file {mask}")
        return write_mask_file(out, single, _single(loaded.meta, subset))
    out = check_output_dir(out)
    path = Path(resolve_model(model))
    if dtype is None and path.is_dir():
        dtype = stored_dtype(path, denoiser_component(read_model_index(path), path))
    pipe = load_pipeline(model, device or "cpu", dtype)
    pruning = apply_masks(denoiser_of(pipe), loaded, subset, backend, getattr(pipe, "memloc_source", None))
    try:
        with atomic_dir(out) as tmp, quiet_libraries():
            pipe.save_pretrained(str(tmp))
            write_mask_file(tmp / MASK_IN_PIPELINE, single, _single(loaded.meta, subset))
    finally:
        pruning.undo()
    return out


def _single(meta: dict, subset: int | None) -> dict:
    """Metadata of the one mask that was applied."""
    meta = {k: v for k, v in meta.items() if k not in ("format", "version")}
    meta["applied"] = "union of all subsets" if subset is None else f"subset {subset}"
    if subset is not None:
        meta["subsets"] = [meta["subsets"][subset]]
    return meta


def load_pruned(
    model: str | os.PathLike | None,
    mask: str | os.PathLike,
    *,
    subset: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    backend: str = "auto",
):
    """Load a pipeline and apply a (packed) mask file to it at load time; returns ``(pipe, pruning)``.

    ``pruning.undo()`` gives back the original model.
    """
    loaded = read_mask_file(mask)
    pipe = load_pipeline(model, device, dtype)
    pruning = apply_masks(denoiser_of(pipe), loaded, subset, backend, getattr(pipe, "memloc_source", None))
    return pipe, pruning
