"""The data every memorized_mask benchmark uses: FFN-2 layer shapes, random weights and statistics."""

from __future__ import annotations

import torch

# FFN second layers (d_out, d_in). SD1.5: 16 transformer blocks with inner dim 4 x channels.
# SDXL (block_out_channels 320/640/1280, transformer_layers_per_block 1/2/10, no attention at
# 320, mid block 10 layers): down 2x2 at 640 + 2x10 at 1280, mid 10, up 3x10 at 1280 + 3x2 at
# 640 -> 10 x (640, 2560) + 60 x (1280, 5120) = 409.6 M weights, as FACTS.md says.
SD15 = [(320, 1280)] * 5 + [(640, 2560)] * 5 + [(1280, 5120)] * 6
SDXL = [(640, 2560)] * 10 + [(1280, 5120)] * 60
SPARSITY = 0.01


def layer_stats(shapes, lead, seed: int = 0, heavy: bool = False, device: str = "cuda"):
    """fp16 weights ~ N(0, 0.02) and log-normal statistics ``[*lead, d_in]`` (plus one null vector)
    per layer. ``heavy``: 0.5 % of each layer's columns get 100x larger statistics in every vector,
    as real activations have a few dominant features."""
    g = torch.Generator(device=device).manual_seed(seed)
    weights, sumsqs = [], []
    for d_out, d_in in shapes:
        weights.append(torch.randn(d_out, d_in, device=device, dtype=torch.float16, generator=g) * 0.02)
        sumsqs.append(torch.exp(torch.randn(*lead, d_in, device=device, generator=g) * 1.5) * 1e3)
    nulls = [torch.exp(torch.randn(d_in, device=device, generator=g) * 1.5) * 1e3 for _, d_in in shapes]
    if heavy:
        for s, n in zip(sumsqs, nulls):
            cols = torch.randperm(n.numel(), device=device, generator=g)[: max(1, n.numel() // 200)]
            s[..., cols] *= 100.0
            n[cols] *= 100.0
    return weights, sumsqs, nulls


def empty_outs(mk, weights, lead):
    """Zeroed packed masks for ``memorized_masks(..., outs=)``: ``[lead[0], d_out, words]`` per layer."""
    return [mk.PackedMask(torch.zeros(*lead[:1], w.shape[0], mk.n_words(w.shape[1]), dtype=torch.int32,
                                      device=w.device), w.shape[1]) for w in weights]


def mismatches(mk, weights, sumsqs, nulls, subsets: int | None = None, backend: str = "triton",
               sparsity: float = SPARSITY) -> int:
    """Mask entries that differ from the reference (batched: the first ``subsets`` subsets only)."""
    from memloc_kernels import reference as ref

    part = [s if subsets is None else s[:subsets] for s in sumsqs]
    got = mk.memorized_masks(weights, part, nulls, sparsity, check_finite=False, backend=backend)
    return sum(int((mk.unpack_mask(g) != ref.memorized_mask(w, s, n, sparsity)).sum())
               for g, w, s, n in zip(got, weights, part, nulls))
