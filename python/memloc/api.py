"""The Python API: one function per ``memloc`` subcommand, plus the pieces they are built from."""

from .analyze import analyze
from .collect import collect_statistics
from .ffn import FFNLayer, find_ffn_layers
from .generate import generate
from .localize import MaskFile, SubsetStatistics, localize, read_mask_file, resolve_subsets, subset_masks
from .pipeline import load_denoiser, load_pipeline
from .prompts import read_prompts
from .prune import Pruning, apply_masks, load_pruned, prune
from .stats import Stats, load_stats

__all__ = [
    "FFNLayer",
    "MaskFile",
    "Pruning",
    "Stats",
    "SubsetStatistics",
    "analyze",
    "apply_masks",
    "collect_statistics",
    "find_ffn_layers",
    "generate",
    "load_denoiser",
    "load_pipeline",
    "load_pruned",
    "load_stats",
    "localize",
    "prune",
    "read_mask_file",
    "read_prompts",
    "resolve_subsets",
    "subset_masks",
]
