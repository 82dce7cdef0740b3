"""The baseline of bench_driver.py: hook-based batched PyTorch statistics and torch.topk localization.

What a careful PyTorch user writes without memloc: one batch per 10-prompt subset (both CFG halves,
stopping after the tau + 1 UNet evaluations), forward pre-hooks on every ``ff.net.2`` that add
``h.float().pow(2).sum`` over the latent tokens per sample, then eq. 5-7 per layer with
``torch.topk`` over all timesteps at once.
"""

from __future__ import annotations

import math

import torch

_RANK = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def ffn_second_layers(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of every ``ff.net.2`` in forward order (down, mid, up)."""
    found = [(n, m) for n, m in unet.named_modules() if n.endswith("ff.net.2")]
    return sorted(found, key=lambda item: (_RANK.get(item[0].split(".")[0], 1), found.index(item)))


def hooked_sums(runner, layers, prompts: list[str], seeds: list[int]) -> list[torch.Tensor]:
    """Per layer ``[T, 2B, d_in]`` float32 sums of squares; rows ``:B`` unconditional, ``B:`` conditional."""
    n, t_count = 2 * len(prompts), runner.n_steps
    sums = [torch.zeros(t_count, n, m.in_features, device=m.weight.device) for _, m in layers]
    step = [0]

    def hook_for(i):
        def hook(module, args):
            h = args[0]
            sums[i][step[0]] += h.float().pow(2).sum(dim=1)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(i)) for i, (_, m) in enumerate(layers)]
    try:
        runner.run(prompts, seeds, on_step=lambda i: step.__setitem__(0, i))
    finally:
        for handle in handles:
            handle.remove()
    return sums


def topk_masks(weight: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Eq. 5-7 for one layer: ``cond``/``uncond`` ``[T, d_in]`` -> bool ``[d_out, d_in]``."""
    k = max(1, math.floor(sparsity * weight.shape[1] + 1e-9))
    magnitude = weight.float().abs()
    scores = magnitude[None] * cond.sqrt()[:, None, :]  # eq. 2/4, [T, d_out, d_in]
    null_scores = magnitude[None] * uncond.sqrt()[:, None, :]
    top = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)  # eq. 5
    return (top & (scores > null_scores)).any(dim=0)  # eq. 6, eq. 7


def run_baseline(runner, prompts: list[str], seeds: list[int], subsets: list[list[int]], sparsity: float):
    """Masks per subset (list over subsets of lists over layers), one batch per subset."""
    layers = ffn_second_layers(runner.pipe.unet)
    masks = []
    with torch.inference_mode():
        for subset in subsets:
            sums = hooked_sums(runner, layers, [prompts[i] for i in subset], [seeds[i] for i in subset])
            b = len(subset)
            masks.append([
                topk_masks(m.weight, s[:, b:].sum(1), s[:, :b].sum(1), sparsity) for (_, m), s in zip(layers, sums)
            ])
    return masks
