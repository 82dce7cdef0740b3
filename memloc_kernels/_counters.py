"""Device-resident int32 event counters that kernels add to (exact-path problems and the like)."""

from __future__ import annotations

import torch

_COUNTERS: dict[tuple[str, str], torch.Tensor] = {}


def device_counters(owner: str, n: int, device: torch.device) -> torch.Tensor:
    """int32 ``[n]`` zeros on ``device`` the first time, the same tensor for ``owner`` afterwards.

    ``"cuda"`` and ``"cuda:<current>"`` share one tensor. Kernels add to it; benchmarks and tests
    read and reset it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (owner, str(device))
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return _COUNTERS[key]
