"""Run metadata the benchmarks record beside their timings: the code's commit and the GPU's name."""

from __future__ import annotations

import csv
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


def write_rows(rows: list[dict], name: str, fields: list[str] | None = None) -> Path | None:
    """Write ``rows`` as ``$OUT/name`` (atomically; nothing when OUT is unset or there are no rows)."""
    if not os.environ.get("OUT") or not rows:
        return None
    from memloc.io import atomic_path

    path = Path(os.environ["OUT"]) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return path
