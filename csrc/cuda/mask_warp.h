// The warp kernel of memorized_mask (mask_warp.cu), called by the launcher in memorized_mask.cu.
#pragma once

#include <cstdint>
#include <vector>

#include "ops.h"

namespace memloc::cuda {

// Whether the warp kernel takes this layer: d_in a multiple of 8 and at most 8192, k at most 96
// and at most d_in / 8 (the bound counts 8-column blocks), 16-byte aligned weight and norm rows,
// and the environment does not set MEMLOC_CUDA_MASK=block (which keeps the block kernel).
bool memorized_mask_warp_eligible(const MaskLayerArgs& a);

// Eq. 5-7 for eligible layers, one launch per (chunks, dtype, staging) class. `stats`: 0, or the
// address of a device int32 that counts the (row, vector) problems decided by the exact path.
void memorized_mask_warp(const std::vector<const MaskLayerArgs*>& layers, std::uintptr_t stream, int device,
                         std::uintptr_t stats);

}  // namespace memloc::cuda
