"""memloc_kernels: GPU/CPU kernels that localize and prune memorization in diffusion models.

``import memloc_kernels as mk`` gives the ops API (see ``memloc_kernels.ops``); ``reference`` is the
plain-PyTorch oracle. Importing never fails for lack of the compiled extension or of CUDA.
"""

from . import reference
from ._dispatch import AUTO_ORDER, BackendUnavailableError, available_backends
from .ops import (
    accumulate_sumsq,
    apply_mask,
    geglu_sumsq,
    mask_density,
    mask_iou,
    memorized_mask,
    memorized_masks,
    pack_mask,
    restore,
    topk_count,
    unpack_mask,
    wanda_scores,
)
from .types import PackedMask, PruneRecord, n_words

__version__ = "0.1.0"

__all__ = [
    "AUTO_ORDER",
    "BackendUnavailableError",
    "PackedMask",
    "PruneRecord",
    "accumulate_sumsq",
    "apply_mask",
    "available_backends",
    "geglu_sumsq",
    "mask_density",
    "mask_iou",
    "memorized_mask",
    "memorized_masks",
    "n_words",
    "pack_mask",
    "reference",
    "restore",
    "topk_count",
    "unpack_mask",
    "wanda_scores",
    "__version__",
]
