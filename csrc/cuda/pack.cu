// pack_mask / unpack_mask between bool [rows, d_in] and int32 words [rows, ceil(d_in / 32)].
//
// Packing is one ballot per word: lane l of a warp reads column 32 * word + l (32 coalesced
// bytes) and the ballot is the word, bit j % 32 of word j / 32. Unpacking writes one byte per
// thread. Bits past d_in are written as zero.
#include <algorithm>

#include "common.cuh"

namespace memloc::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    pack_kernel(const std::uint8_t* __restrict__ mask, std::int64_t rows, std::int64_t d_in,
                std::uint32_t* __restrict__ words) {
  const std::int64_t n_words = (d_in + 31) / 32;
  const std::int64_t total = rows * n_words;
  const int lane = threadIdx.x & 31;
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * (kThreads / 32);
  for (std::int64_t i = (static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32; i < total;
       i += warps) {  // warp-uniform loop: i depends on the warp only
    const std::int64_t row = i / n_words;
    const std::int64_t col = (i % n_words) * 32 + lane;
    const bool bit = col < d_in && mask[row * d_in + col] != 0;
    const unsigned word = __ballot_sync(kFullMask, bit);
    if (lane == 0) words[i] = word;
  }
}

__global__ void __launch_bounds__(kThreads)
    unpack_kernel(const std::uint32_t* __restrict__ words, std::int64_t rows, std::int64_t d_in,
                  std::uint8_t* __restrict__ mask) {
  const std::int64_t n_words = (d_in + 31) / 32;
  const std::int64_t total = rows * d_in;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * kThreads) {
    const std::int64_t row = i / d_in;
    const std::int64_t col = i % d_in;
    mask[i] = static_cast<std::uint8_t>((__ldg(words + row * n_words + col / 32) >> (col % 32)) & 1u);
  }
}

unsigned grid_for(std::int64_t threads_needed, int sms) {
  return static_cast<unsigned>(std::max<std::int64_t>(1, std::min<std::int64_t>(ceil_div(threads_needed, kThreads),
                                                                                 32LL * sms)));
}

}  // namespace

void pack_mask(std::uintptr_t mask, std::int64_t rows, std::int64_t d_in, std::uintptr_t words,
               std::uintptr_t stream, int device) {
  MEMLOC_REQUIRE(rows >= 0 && d_in >= 0, "pack_mask: negative size");
  if (rows == 0 || d_in == 0) return;
  MEMLOC_REQUIRE(mask != 0 && words != 0, "pack_mask: null pointer");
  DeviceGuard guard(device);
  const unsigned grid = grid_for(rows * ceil_div(d_in, 32) * 32, sm_count(device));
  pack_kernel<<<grid, kThreads, 0, as_stream(stream)>>>(reinterpret_cast<const std::uint8_t*>(mask), rows, d_in,
                                                         reinterpret_cast<std::uint32_t*>(words));
  MEMLOC_CUDA_CHECK_LAUNCH();
}

void unpack_mask(std::uintptr_t words, std::int64_t rows, std::int64_t d_in, std::uintptr_t mask,
                 std::uintptr_t stream, int device) {
  MEMLOC_REQUIRE(rows >= 0 && d_in >= 0, "unpack_mask: negative size");
  if (rows == 0 || d_in == 0) return;
  MEMLOC_REQUIRE(mask != 0 && words != 0, "unpack_mask: null pointer");
  DeviceGuard guard(device);
  const unsigned grid = grid_for(rows * d_in, sm_count(device));
  unpack_kernel<<<grid, kThreads, 0, as_stream(stream)>>>(reinterpret_cast<const std::uint32_t*>(words), rows, d_in,
                                                           reinterpret_cast<std::uint8_t*>(mask));
  MEMLOC_CUDA_CHECK_LAUNCH();
}

}  // namespace memloc::cuda
