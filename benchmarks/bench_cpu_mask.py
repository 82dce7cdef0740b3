"""memorized_mask on SD1.5's 16 FFN second layers: the C++ cpu backend against the reference, in one run.

Run: ``pytest benchmarks/bench_cpu_mask.py --benchmark-enable`` (add ``--benchmark-json=FILE`` for
machine-readable rows). One (subset, timestep): fp16 weights, s = 1%, one sumsq vector per layer.

Providers:
- ``reference``: the oracle ``memloc_kernels.reference.memorized_mask`` (scores, ``torch.topk``,
  the exact lower-column tie rule, null comparison; bool masks, no packing).
- ``torch_topk``: for scale only, not an oracle: scores, ``torch.topk`` indices scattered into a
  mask, null comparison, with ties left to ``torch.topk`` (the "score + topk + null comparison"
  figure of FACTS.md).
- ``cpu``: the C++ backend through the public API, ``mk.memorized_masks(..., backend="cpu")``,
  which validates the inputs and returns packed masks; its masks are checked against the oracle.
The group's table gives each provider's median; the ratios of medians are printed at the end and
stored in the cpu row's extra_info.
"""

from __future__ import annotations

import pytest
import torch

import memloc_kernels as mk
from memloc_kernels import reference as ref
from memloc_kernels.backends import cpu as cpu_backend

SD15_FFN2 = [(320, 1280)] * 5 + [(640, 2560)] * 5 + [(1280, 5120)] * 6
SPARSITY = 0.01
GROUP = "memorized_mask SD1.5 FFN-2 x16 fp16 s=1%"
_MEDIANS: dict[str, float] = {}


@pytest.fixture(scope="module")
def layers():
    """Random SD1.5-shaped fp16 weights (std 0.02) and positive sums of squares, seeded."""
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(shape, generator=gen) * 0.02).half() for shape in SD15_FFN2]
    sumsqs = [torch.rand(d_in, generator=gen).pow(2) * 1e4 for _, d_in in SD15_FFN2]
    null_sumsqs = [torch.rand(d_in, generator=gen).pow(2) * 1e4 for _, d_in in SD15_FFN2]
    return weights, sumsqs, null_sumsqs


def _reference(weights, sumsqs, null_sumsqs):
    return [ref.memorized_mask(w, s, n, SPARSITY) for w, s, n in zip(weights, sumsqs, null_sumsqs)]


def _torch_topk(weights, sumsqs, null_sumsqs):
    masks = []
    for w, s, n in zip(weights, sumsqs, null_sumsqs):
        magnitude = w.float().abs()
        scores = magnitude * s.sqrt()
        top = torch.topk(scores, ref.topk_count(SPARSITY, w.shape[1]), dim=-1).indices
        selected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        masks.append(selected & (scores > magnitude * n.sqrt()))
    return masks


def _cpu(weights, sumsqs, null_sumsqs):
    return mk.memorized_masks(weights, sumsqs, null_sumsqs, SPARSITY, backend="cpu")


# (function, timed rounds); the cpu row comes last so that it can report the ratios
PROVIDERS = {"reference": (_reference, 5), "torch_topk": (_torch_topk, 5), "cpu": (_cpu, 30)}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_memorized_mask_sd15_ffn2(benchmark, record_property, layers, provider):
    if provider == "cpu" and not cpu_backend.BACKEND.availability()[0]:
        pytest.skip(f"cpu backend not built: {cpu_backend.BACKEND.availability()[1]}")
    fn, rounds = PROVIDERS[provider]
    benchmark.group = GROUP
    benchmark.extra_info.update(
        op="memorized_mask",
        shapes="5x(320,1280) 5x(640,2560) 6x(1280,5120)",
        dtype="float16",
        sparsity=SPARSITY,
        backend=provider,
        threads=torch.get_num_threads(),
        weights=sum(o * i for o, i in SD15_FFN2),
    )
    masks = benchmark.pedantic(fn, args=layers, rounds=rounds, warmup_rounds=1, iterations=1)
    _MEDIANS[provider] = benchmark.stats.stats.median

    if provider == "cpu":  # what was timed must be right
        expected = _reference(*layers)
        for i, (packed, want) in enumerate(zip(masks, expected)):
            got = mk.unpack_mask(packed)
            assert torch.equal(got, want), f"layer {i}: {(got != want).sum().item()} mask entries differ"
        cpu_s = _MEDIANS["cpu"]
        for other in ("reference", "torch_topk"):
            if other in _MEDIANS:
                other_s = _MEDIANS[other]
                benchmark.extra_info[f"speedup_vs_{other}"] = round(other_s / cpu_s, 2)
                # printed at the end of the run by benchmarks/conftest.py
                record_property(
                    "benchmark_summary",
                    f"{GROUP}: median {other} {other_s * 1e3:.1f} ms, cpu {cpu_s * 1e3:.1f} ms, "
                    f"ratio {other_s / cpu_s:.1f}x ({torch.get_num_threads()} threads)",
                )
