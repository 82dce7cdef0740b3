"""The reference backend: canonical-signature adapters over ``memloc_kernels.reference``."""

from __future__ import annotations

import torch

from .. import reference as ref


class ReferenceBackend:
    name = "reference"
    device_note = "runs on any device PyTorch supports"

    def availability(self) -> tuple[bool, str]:
        return True, ""

    def supports(self, device: torch.device) -> bool:
        return True

    def accumulate_sumsq(self, h, acc, group_size):
        ref.accumulate_sumsq(h, acc, group_size)

    def geglu_sumsq(self, proj_out, acc, group_size):
        return ref.geglu_sumsq(proj_out, acc, group_size)

    def wanda_scores(self, weight, sumsq):
        return ref.wanda_scores(weight, sumsq)

    def memorized_mask(self, weight, sumsq, null_sumsq, k, out):
        mask = ref.memorized_mask_topk(weight, sumsq, null_sumsq, k)
        out |= ref.pack_mask(mask.reshape(-1, weight.shape[1])).reshape(out.shape)

    def pack_mask(self, mask):
        return ref.pack_mask(mask)

    def unpack_mask(self, words, d_in):
        return ref.unpack_mask(words, d_in)

    def apply_mask(self, weight, words):
        return ref.apply_mask(weight, ref.unpack_mask(words, weight.shape[1]))

    def restore(self, weight, words, removed):
        ref.restore(weight, ref.unpack_mask(words, weight.shape[1]), removed)

    def mask_popcount(self, words):
        return ref.unpack_mask(words, words.shape[-1] * 32).sum(dim=-1, dtype=torch.int64)

    def mask_intersections(self, words):
        bits = ref.unpack_mask(words, words.shape[-1] * 32).to(torch.float64)
        return (bits @ bits.T).round().to(torch.int64)


BACKEND = ReferenceBackend()
