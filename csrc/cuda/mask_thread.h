// The thread kernel of memorized_mask (mask_thread.cu), called by the launcher in memorized_mask.cu.
#pragma once

#include <cstdint>
#include <vector>

#include "ops.h"

namespace memloc::cuda {

// Whether the thread kernel takes this layer: MEMLOC_CUDA_MASK unset (then only batched calls with
// at least 16 norm vectors per layer) or "thread" (any number); d_in a multiple of 256 and at most
// 8192, k at most 64 and at most d_in / 8, 16-byte aligned weight and norm rows.
bool memorized_mask_thread_eligible(const MaskLayerArgs& a);

// Eq. 5-7 for eligible layers, one launch per (dtype, chunks) class. `stats`: 0, or the address of
// a device int32 that counts the (row, vector) problems its per-thread path left to the warp path.
void memorized_mask_thread(const std::vector<const MaskLayerArgs*>& layers, std::uintptr_t stream, int device,
                           std::uintptr_t stats);

}  // namespace memloc::cuda
