"""The Triton backend: canonical-signature adapters over the kernels in ``memloc_kernels.triton``."""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

# Found without importing it: importing triton fixes the compiled/interpreted choice (see _kernels).
_IMPORT_ERROR = "" if importlib.util.find_spec("triton") is not None else "triton is not importable (not installed)"


def _kernels(name: str):
    """The kernel module ``memloc_kernels.triton.<name>`` (imported on first use).

    Triton decides when it is imported, and when a kernel is decorated, whether kernels are
    compiled or interpreted (TRITON_INTERPRET), so nothing here imports triton before a kernel
    is actually needed.
    """
    return importlib.import_module(f"memloc_kernels.triton.{name}")


class TritonBackend:
    name = "triton"
    device_note = "runs on CUDA devices, and on the CPU only under TRITON_INTERPRET=1"

    def availability(self) -> tuple[bool, str]:
        if _IMPORT_ERROR:
            return False, _IMPORT_ERROR
        if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
            return True, ""
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"

    def supports(self, device: torch.device) -> bool:
        if device.type == "cuda":
            return True
        return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"

    def accumulate_sumsq(self, h, acc, group_size):
        _kernels("sumsq").accumulate_sumsq_triton(h, acc, group_size)

    def geglu_sumsq(self, proj_out, acc, group_size):
        return _kernels("geglu").geglu_sumsq_triton(proj_out, acc, group_size)

    def wanda_scores(self, weight, sumsq):
        return _kernels("scores").wanda_scores_triton(weight, sumsq)

    def memorized_mask(self, weight, sumsq, null_sumsq, k, out):
        _kernels("mask").memorized_mask_triton(weight, sumsq, null_sumsq, k, out)

    def memorized_mask_multi(self, weights, sumsqs, null_sumsqs, ks, outs):
        _kernels("mask").memorized_mask_multi_triton(weights, sumsqs, null_sumsqs, ks, outs)

    def pack_mask(self, mask):
        return _kernels("pack").pack_mask_triton(mask)

    def unpack_mask(self, words, d_in):
        return _kernels("pack").unpack_mask_triton(words, d_in)

    def apply_mask(self, weight, words):
        return _kernels("prune").apply_mask_triton(weight, words)

    def restore(self, weight, words, removed):
        _kernels("prune").restore_triton(weight, words, removed)

    def mask_popcount(self, words):
        return _kernels("iou").mask_popcount_triton(words)

    def mask_intersections(self, words):
        return _kernels("iou").mask_intersections_triton(words)


BACKEND = TritonBackend()
