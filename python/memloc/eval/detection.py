"""Wen et al.'s memorization detection metric: how strongly the prompt pulls the noise prediction.

``d(p) = 1/T sum_t ||eps(z_t, t, e_p) - eps(z_t, t, e_null)||_2`` along the classifier-free-guided
sampling trajectory (Wen et al., "Detecting, Explaining, and Mitigating Memorization in Diffusion
Models", ICLR 2024, Sec. 3): large for memorized prompts, which steer every sample to one image.
The norm is over all of a sample's latent values (pixels for pixel-space models) in float32; for
``v``-prediction models it is the difference of the ``v`` outputs. It needs only the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .sampling import check_pipeline, encode_prompts, generate, seeds_for


def detection_metric(
    pipe,
    prompts: Sequence[str] | None = None,
    *,
    embeds: torch.Tensor | None = None,
    samples: int = 1,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    max_steps: int | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """The detection metric of each prompt, averaged over ``samples`` seeds; float64 ``[P]``.

    Give ``prompts`` or their text embeddings ``embeds`` ``[P, L, D]`` (e.g. mitigated ones).
    ``max_steps`` stops after the first steps (Wen et al. find the first step already separates
    memorized prompts); the mean is then over those steps.
    """
    check_pipeline(pipe)
    if (prompts is None) == (embeds is None):
        raise ValueError("give exactly one of prompts and embeds")
    cond = encode_prompts(pipe, prompts) if embeds is None else embeds
    null = encode_prompts(pipe, [""])
    seeds = [seeds_for(p, samples, seed) for p in range(cond.shape[0])]
    out = generate(
        pipe,
        cond,
        null,
        seeds,
        steps=steps,
        guidance=guidance,
        batch_size=batch_size,
        decode_images=False,
        max_steps=max_steps,
    )
    return np.asarray([batch.detection.mean() for batch in out], dtype=np.float64)
