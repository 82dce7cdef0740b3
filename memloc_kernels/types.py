"""Value types of the ops API: bit-packed masks and the undo record of a pruning."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedMask:
    """A boolean mask ``[..., d_in]`` stored as int32 words ``[..., ceil(d_in / 32)]``.

    Bit ``j % 32`` of word ``j // 32`` (least significant bit first) holds column ``j``; bits past
    ``d_in`` in the last word are always zero. ``words`` of a matrix mask has shape
    ``[d_out, n_words]``; a batch of masks has leading dims, e.g. ``[S, d_out, n_words]``.
    """

    words: torch.Tensor
    d_in: int

    def __post_init__(self) -> None:
        if not isinstance(self.words, torch.Tensor):
            raise TypeError(f"PackedMask.words must be a torch.Tensor, got {type(self.words).__name__}")
        if isinstance(self.d_in, bool) or not isinstance(self.d_in, numbers.Integral) or self.d_in <= 0:
            raise ValueError(f"PackedMask.d_in must be a positive int, got {self.d_in!r}")
        if self.words.dtype != torch.int32:
            raise TypeError(f"PackedMask.words must be int32, got {self.words.dtype}")
        if self.words.dim() < 1 or self.words.shape[-1] != n_words(self.d_in):
            raise ValueError(
                f"PackedMask.words must have last dim ceil({self.d_in} / 32) = {n_words(self.d_in)}, "
                f"got shape {tuple(self.words.shape)}"
            )

    def check_padding(self, name: str = "mask") -> None:
        """Raise ValueError if a bit past ``d_in`` is set in some last word (one device sync)."""
        if self.d_in % 32 == 0 or self.words.numel() == 0:
            return
        # arithmetic shift: the sign bit (column 31 of the word) counts too
        if bool((self.words[..., -1] >> (self.d_in % 32)).any()):
            raise ValueError(f"{name} has bits set past column {self.d_in - 1} (padding bits must be zero)")

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the boolean mask this packs."""
        return (*self.words.shape[:-1], self.d_in)

    @property
    def device(self) -> torch.device:
        return self.words.device

    def __getitem__(self, index) -> PackedMask:
        """Index the leading (non-column) dims, e.g. ``masks[s]`` of a ``[S, d_out, d_in]`` batch."""
        words = self.words[index]
        if words.dim() == 0 or words.shape[-1] != self.words.shape[-1]:
            raise IndexError("PackedMask indexing may not touch the packed column dim")
        return PackedMask(words, self.d_in)

    def to(self, device) -> PackedMask:
        return PackedMask(self.words.to(device), self.d_in)

    def clone(self) -> PackedMask:
        return PackedMask(self.words.clone(), self.d_in)


@dataclass(frozen=True)
class PruneRecord:
    """What :func:`memloc_kernels.apply_mask` removed, for an exact :func:`memloc_kernels.restore`.

    ``removed`` holds the original values of the masked weights in row-major order, in the
    weight's dtype, so restoring puts back the same bits (signed zeros and NaN payloads included).
    """

    mask: PackedMask
    removed: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def count(self) -> int:
        return int(self.removed.numel())


def n_words(d_in: int) -> int:
    """Number of int32 words that pack ``d_in`` bits."""
    return (d_in + 31) // 32
