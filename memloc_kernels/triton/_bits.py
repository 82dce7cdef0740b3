"""Bit helpers shared by the packed-mask kernels: 32-bit popcount (hardware or SWAR)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def popcount32(x, HW: tl.constexpr):
    """Set bits of each int32 of ``x`` (int32 result).

    ``HW``: the GPU's population-count instruction (libdevice ``popc``); otherwise a SWAR count,
    which the interpreter can run (it has no libdevice).
    """
    if HW:
        return libdevice.popc(x)
    else:
        u = x.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        u = (u * 0x01010101) >> 24
        return u.to(tl.int32, bitcast=True)
