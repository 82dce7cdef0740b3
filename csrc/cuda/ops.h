// Host entry points of the CUDA kernels: plain C++ (no CUDA or torch headers), for bindings_cuda.cpp.
//
// Tensors cross as raw device addresses (Python ints from Tensor.data_ptr()) plus sizes, a dtype
// code and the caller's CUDA stream (torch.cuda.current_stream().cuda_stream); see README.md.
// Every function checks its arguments (std::invalid_argument, a ValueError in Python) and every
// CUDA call (std::runtime_error naming file:line and the CUDA error). Launches are asynchronous on
// `stream`; `device` is the CUDA device index that owns every pointer.
#pragma once

#include <cstdint>
#include <vector>

namespace memloc::cuda {

// Element type codes shared with memloc_kernels/backends/cuda.py (_DTYPE_CODES).
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// One layer of memorized_mask: weight [d_out, d_in] of `dtype` (f16/bf16/f32); norms and
// null_norms float32 [S, T, d_in], the IEEE square roots of sumsq (taken in Python with torch.sqrt
// so they are the reference's bits); out int32 [S, d_out, ceil(d_in / 32)] that the result is
// OR-ed into; k selected columns per row, 1 <= k <= d_in.
struct MaskLayerArgs {
  std::uintptr_t weight = 0, norms = 0, null_norms = 0, out = 0;
  // 0, or float32 [S, T, d_in / 2]: the larger of each column pair of norms, NaN where either is
  // not finite (the warp kernel's bound path for batched calls; Python's _pair_maxima).
  std::uintptr_t pair_norms = 0;
  int dtype = 0;
  std::int64_t d_out = 0, d_in = 0, k = 0, S = 0, T = 0;
};

// Eq. 2/4: out float32 [S, d_out, d_in] = |float(W)| * norms[s] for weight [d_out, d_in] of `dtype`
// (f16/bf16/f32) and norms float32 [S, d_in] (IEEE square roots of sumsq, taken in Python).
void wanda_scores(std::uintptr_t weight, int dtype, std::int64_t d_out, std::int64_t d_in, std::uintptr_t norms,
                  std::int64_t S, std::uintptr_t out, std::uintptr_t stream, int device);

// Largest d_in that memorized_mask handles (the row is held in registers of one block).
std::int64_t memorized_mask_max_d_in();

// Eq. 5-7 for every layer: OR into out[s] the union over t of (row top-k of |W| * norms[s, t],
// ties to the lower column) AND (score > |W| * null_norms[s, t]). Layers of one shape class share
// a launch (a pointer table passed as a kernel parameter). Layers that suit it run the warp kernel
// (mask_warp.cu), the others the block kernel (memorized_mask.cu). `stats`: 0, or the address of
// a device int32 [2]: [0] counts the (row, vector) problems decided by an exact path, [1] those
// the warp kernel's bound path handed to its block-maxima path.
void memorized_mask(const std::vector<MaskLayerArgs>& layers, std::uintptr_t stream, int device,
                    std::uintptr_t stats = 0);

// out float32 [n_pairs]: max(|norms[2i]|, |norms[2i + 1]|), NaN where either is not finite (the
// warp kernel's pair bounds, MaskLayerArgs::pair_norms). n_pairs even; norms 16-byte aligned.
void pair_norm_maxima(std::uintptr_t norms, std::int64_t n_pairs, std::uintptr_t out, std::uintptr_t stream,
                      int device);

// Per-row popcounts of words [rows, n_words] into out int64 [rows]. With d_in >= 0 the bits of the
// last word past d_in are ignored (a row of a [rows, d_in] mask); with d_in < 0 every bit counts.
void mask_popcount(std::uintptr_t words, std::int64_t rows, std::int64_t n_words, std::int64_t d_in,
                   std::uintptr_t out, std::uintptr_t stream, int device);

// out int64 [n, n]: popcount(words[a] & words[b]) for every pair, words [n, n_words].
void mask_intersections(std::uintptr_t words, std::int64_t n, std::int64_t n_words, std::uintptr_t out,
                        std::uintptr_t stream, int device);

// Bytes of scratch that accumulate_sumsq needs for these sizes (0 when it needs none).
std::int64_t accumulate_sumsq_workspace_bytes(std::int64_t rows, std::int64_t d_in, std::int64_t group_size,
                                              int acc_dtype);

// acc[g, j] += sum over the group_size rows of group g of h[row, j]^2, in acc's dtype (f32/f64).
// h [rows, d_in] is f16/bf16/f32/f64. Deterministic: fixed row chunks, fixed summation order.
void accumulate_sumsq(std::uintptr_t h, int h_dtype, std::int64_t rows, std::int64_t d_in, std::uintptr_t acc,
                      int acc_dtype, std::int64_t group_size, std::uintptr_t workspace,
                      std::int64_t workspace_bytes, std::uintptr_t stream, int device);

// apply (restore = false): removed[offsets[r] + i] = weight[r, c_i]; weight[r, c_i] = +0 for the
// i-th set bit c_i of row r, in column order. restore = true writes the values back. offsets
// int64 [d_out] is the exclusive scan of the per-row counts (mask_popcount with d_in). Values are
// copied as raw bits (f16/bf16/f32/f64), so NaN payloads and signed zeros survive.
void apply_mask(std::uintptr_t weight, int dtype, std::int64_t d_out, std::int64_t d_in, std::uintptr_t words,
                std::uintptr_t offsets, std::uintptr_t removed, bool restore, std::uintptr_t stream, int device);

// mask uint8 (torch.bool) [rows, d_in] <-> words int32 [rows, ceil(d_in / 32)], bit j % 32 of word j / 32.
void pack_mask(std::uintptr_t mask, std::int64_t rows, std::int64_t d_in, std::uintptr_t words,
               std::uintptr_t stream, int device);
void unpack_mask(std::uintptr_t words, std::int64_t rows, std::int64_t d_in, std::uintptr_t mask,
                 std::uintptr_t stream, int device);

}  // namespace memloc::cuda
