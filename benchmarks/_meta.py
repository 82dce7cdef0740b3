"""Run metadata the benchmarks record beside their timings: the code's commit and the GPU's name."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """$MEMLOC_COMMIT if set (a copy of the tree without .git), else this checkout's HEAD, else 'unknown'."""
    if os.environ.get("MEMLOC_COMMIT"):
        return os.environ["MEMLOC_COMMIT"]
    if not (REPO / ".git").exists():  # git would report an enclosing repository's HEAD
        return "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:  # metadata only: a benchmark must not fail over it
        return "unknown"


def gpu_name() -> str:
    """The current CUDA device's name, or 'cpu' without one."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
