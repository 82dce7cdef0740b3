"""Discovery of the transformer feed-forward layers whose second linear layer memloc localizes and prunes.

Naming: a layer is named by the module path of its second linear layer inside the denoiser, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2`` (SD1.x UNet) or
``transformer_blocks.3.ff.net.2`` (PixArt/DiT/SD3 transformers). These are the names of the
weights in the model's own state dict (minus ``.weight``), so they are stable across saves.

Order: forward order. In a UNet that is the down blocks, the mid block, then the up blocks (the
module registry lists the up blocks before the mid block, so the registry order is not used
as is); inside a block, attentions and transformer blocks in index order. In a transformer it
is the registry order, which is the forward order of ``transformer_blocks`` (SD3's ``ff`` comes
before ``ff_context`` in both).

Kinds: ``geglu`` (SD1.x/2.x/SDXL UNets) is collected by replacing the GEGLU's forward with the
fused ``memloc_kernels.geglu_sumsq``; every other activation (``gelu``, ``gelu-approximate``,
SwiGLU, ...) by a forward pre-hook on the second linear that calls ``accumulate_sumsq`` on its
input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import MemlocError

# UNet top-level containers in forward order; anything else sorts with the mid block.
_UNET_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
FINGERPRINT_SAMPLES = 8


@dataclass
class FFNLayer:
    """One feed-forward block: ``act`` (first linear + activation) then ``linear`` (the second linear)."""

    name: str
    kind: str
    d_out: int
    d_in: int
    linear: torch.nn.Linear
    act: torch.nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight


def _kind(act: torch.nn.Module) -> str:
    from diffusers.models.activations import GEGLU, GELU

    if type(act) is GEGLU:
        return "geglu"
    if isinstance(act, GELU):
        return "gelu" if act.approximate == "none" else f"gelu-{act.approximate}"
    return type(act).__name__.lower()


def find_ffn_layers(denoiser: torch.nn.Module) -> list[FFNLayer]:
    """Every diffusers ``FeedForward``'s second linear layer in ``denoiser``, in forward order."""
    from diffusers.models.attention import FeedForward

    found = []
    for position, (name, module) in enumerate(denoiser.named_modules()):
        if not isinstance(module, FeedForward):
            continue
        net = getattr(module, "net", None)
        if net is None or len(net) < 3 or not isinstance(net[2], torch.nn.Linear):
            raise MemlocError(f"feed-forward {name} of {type(denoiser).__name__} has no second linear layer net.2")
        top = name.split(".", 1)[0]
        found.append((_UNET_ORDER.get(top, 1), position, name, module))
    if not found:
        raise MemlocError(
            f"{type(denoiser).__name__} has no transformer feed-forward layers (diffusers FeedForward); "
            "memloc supports UNet (SD1.x/2.x/SDXL) and DiT/PixArt/SD3-style denoisers"
        )
    found.sort(key=lambda item: item[:2])
    layers = []
    for _, _, name, module in found:
        act, linear = module.net[0], module.net[2]
        layers.append(FFNLayer(f"{name}.net.2", _kind(act), linear.out_features, linear.in_features, linear, act))
    return layers


def fingerprint(layers: list[FFNLayer]) -> list[list[float]]:
    """A few values of each FFN's first linear weight: tells checkpoints apart, unchanged by pruning.

    Pruning only touches the second linear layers, so a pruned model keeps the fingerprint of the
    model it came from; values are compared with a tolerance, so loading in another dtype keeps it.
    """
    picks: list[torch.Tensor | None] = []
    for layer in layers:
        proj = getattr(layer.act, "proj", None)
        weight = proj.weight if isinstance(proj, torch.nn.Linear) else layer.linear.bias
        if weight is None or weight.is_meta:
            picks.append(None)
            continue
        flat = weight.detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, FINGERPRINT_SAMPLES, device=flat.device).round().long()
        picks.append(flat[index].float())
    # one device-to-host copy (one sync) for all layers instead of one per layer
    present = [p for p in picks if p is not None]
    if present and len({p.device for p in present}) == 1:
        host = iter(torch.cat(present).cpu().split(FINGERPRINT_SAMPLES))
        picks = [None if p is None else next(host) for p in picks]
    return [[] if p is None else [float(f"{v:.6g}") for v in p.cpu().tolist()] for p in picks]


def identity(denoiser: torch.nn.Module, layers: list[FFNLayer], source: str | None = None) -> dict:
    """What stats and mask files record about the model they came from."""
    return {
        "denoiser": type(denoiser).__name__,
        "source": source,
        "layers": [
            {"name": layer.name, "d_out": layer.d_out, "d_in": layer.d_in, "kind": layer.kind} for layer in layers
        ],
        "fingerprint": fingerprint(layers),
    }


def check_identity(recorded: dict, actual: dict, what: str) -> None:
    """Refuse a file (``what``, e.g. "mask file m.safetensors") made for a different model."""
    rec_layers = [(x["name"], x["d_out"], x["d_in"]) for x in recorded.get("layers", [])]
    act_layers = [(x["name"], x["d_out"], x["d_in"]) for x in actual["layers"]]
    if len(rec_layers) != len(act_layers):
        raise MemlocError(
            f"{what} is for a model with {len(rec_layers)} FFN layers, this model has {len(act_layers)}"
        )
    for rec, act in zip(rec_layers, act_layers):
        if rec[0] != act[0]:
            raise MemlocError(f"{what} does not match this model: layer {rec[0]} where the model has {act[0]}")
        if rec[1:] != act[1:]:
            raise MemlocError(
                f"{what} does not match this model: layer {rec[0]} is {list(rec[1:])} there, {list(act[1:])} here"
            )
    for name, a, b in zip([x[0] for x in act_layers], recorded.get("fingerprint", []), actual["fingerprint"]):
        if a and b and not _close(a, b):
            raise MemlocError(f"{what} comes from a different model (weights differ at layer {name})")


def _close(a: list[float], b: list[float]) -> bool:
    """Equal up to bfloat16 rounding, so that a dtype change is not taken for another model."""
    if len(a) != len(b):
        return False
    scale = max((abs(x) for x in a + b), default=0.0)
    return all(math.isclose(x, y, rel_tol=1e-2, abs_tol=1e-3 * scale + 1e-12) for x, y in zip(a, b))
