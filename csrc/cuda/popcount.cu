// Popcounts of packed masks: per-row counts, and the N x N intersection counts as popcount tiles.
//
// mask_intersections works like an integer GEMM over 32-bit words with AND + __popc in place of
// multiply-add: a block owns a TM x TM tile of mask pairs (upper triangle of tiles only; each
// pair's count is written to both (a, b) and (b, a)), stages BK words of TM masks of each side in
// shared memory (transposed, so a thread reads its MT masks with one vector load) and keeps an
// MT x MT tile of 32-bit counts in registers. The word range is split over blockIdx.z so that
// a few large masks still fill the GPU; the partial counts are added with 64-bit integer atomics
// into zeroed output, which is exact and order-independent.
#include <algorithm>

#include "common.cuh"

namespace memloc::cuda {
namespace {

constexpr int kPopThreads = 256;
constexpr std::int64_t kPopMinChunk = 4096;      // words per block at least
constexpr std::int64_t kPopMaxChunk = 1LL << 24;  // keeps a block's count < 2^32

// out[row] += popcount of words[row, begin:end) (the bits of the last word past d_in masked off).
template <bool kVec4>
__global__ void __launch_bounds__(kPopThreads)
    popcount_kernel(const std::uint32_t* __restrict__ words, std::int64_t n_words, std::int64_t chunk,
                    std::uint32_t last_mask, unsigned long long* __restrict__ out) {
  __shared__ unsigned s_warp[kPopThreads / 32];
  const std::int64_t row = blockIdx.x;
  const std::int64_t begin = static_cast<std::int64_t>(blockIdx.y) * chunk;
  const std::int64_t end = min(n_words, begin + chunk);
  const std::uint32_t* p = words + row * n_words;
  unsigned count = 0;
  if (kVec4) {  // n_words % 4 == 0, chunk % 4 == 0 and 16-byte aligned rows
    const uint4* p4 = reinterpret_cast<const uint4*>(p);
    for (std::int64_t i = begin / 4 + threadIdx.x; i < end / 4; i += kPopThreads) {
      uint4 v = __ldg(p4 + i);
      if (4 * i + 4 == n_words) v.w &= last_mask;
      count += __popc(v.x) + __popc(v.y) + __popc(v.z) + __popc(v.w);
    }
  } else {
    for (std::int64_t i = begin + threadIdx.x; i < end; i += kPopThreads) {
      std::uint32_t v = __ldg(p + i);
      if (i + 1 == n_words) v &= last_mask;
      count += __popc(v);
    }
  }
  count = __reduce_add_sync(kFullMask, count);
  if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x >> 5] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long total = 0;
    for (int w = 0; w < kPopThreads / 32; ++w) total += s_warp[w];
    if (total != 0) atomicAdd(out + row, total);
  }
}

constexpr int kBK = 32;  // words per shared-memory stage (one per lane when loading)

// TM masks per tile side, MT x MT pairs per thread, (TM / MT)^2 threads.
template <int TM, int MT>
__global__ void __launch_bounds__((TM / MT) * (TM / MT))
    intersections_kernel(const std::uint32_t* __restrict__ words, std::int64_t n, std::int64_t n_words,
                         std::int64_t chunk, unsigned long long* __restrict__ out) {
  constexpr int kSide = TM / MT;
  constexpr int kThreads = kSide * kSide;
  constexpr int kWarps = kThreads / 32;
  constexpr int kLd = TM + 4;  // row stride: keeps MT-word vector reads aligned
  static_assert(kThreads % 32 == 0, "whole warps");
  static_assert(MT == 2 || MT == 4, "vector width");
  __shared__ __align__(16) std::uint32_t s_a[kBK][kLd];
  __shared__ __align__(16) std::uint32_t s_b[kBK][kLd];

  const int tile_a = blockIdx.x;
  const int tile_b = blockIdx.y;
  if (tile_b < tile_a) return;  // the lower triangle mirrors the upper one
  const std::int64_t k_begin = static_cast<std::int64_t>(blockIdx.z) * chunk;
  if (k_begin >= n_words) return;
  const std::int64_t k_end = min(n_words, k_begin + chunk);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int tx = tid % kSide;
  const int ty = tid / kSide;
  const std::int64_t a0 = static_cast<std::int64_t>(tile_a) * TM;
  const std::int64_t b0 = static_cast<std::int64_t>(tile_b) * TM;

  unsigned acc[MT][MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < MT; ++j) acc[i][j] = 0u;
  }

  for (std::int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
    const std::int64_t kk = k0 + lane;
    const bool in_k = kk < k_end;
    for (int r = warp; r < TM; r += kWarps) {  // one mask row per warp: 128 coalesced bytes
      const std::int64_t ga = a0 + r;
      const std::int64_t gb = b0 + r;
      s_a[lane][r] = (in_k && ga < n) ? __ldg(words + ga * n_words + kk) : 0u;
      s_b[lane][r] = (in_k && gb < n) ? __ldg(words + gb * n_words + kk) : 0u;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kBK; ++k) {
      std::uint32_t a[MT], b[MT];
      if constexpr (MT == 4) {
        const uint4 va = *reinterpret_cast<const uint4*>(&s_a[k][ty * MT]);
        const uint4 vb = *reinterpret_cast<const uint4*>(&s_b[k][tx * MT]);
        a[0] = va.x, a[1] = va.y, a[2] = va.z, a[3] = va.w;
        b[0] = vb.x, b[1] = vb.y, b[2] = vb.z, b[3] = vb.w;
      } else {
        const uint2 va = *reinterpret_cast<const uint2*>(&s_a[k][ty * MT]);
        const uint2 vb = *reinterpret_cast<const uint2*>(&s_b[k][tx * MT]);
        a[0] = va.x, a[1] = va.y;
        b[0] = vb.x, b[1] = vb.y;
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int j = 0; j < MT; ++j) acc[i][j] += __popc(a[i] & b[j]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      const std::int64_t a = a0 + ty * MT + i;
      const std::int64_t b = b0 + tx * MT + j;
      if (a < n && b < n && acc[i][j] != 0u) {
        atomicAdd(out + a * n + b, static_cast<unsigned long long>(acc[i][j]));
        if (tile_a != tile_b) atomicAdd(out + b * n + a, static_cast<unsigned long long>(acc[i][j]));
      }
    }
  }
}

template <int TM, int MT>
void launch_intersections(const std::uint32_t* words, std::int64_t n, std::int64_t n_words,
                          unsigned long long* out, int sms, cudaStream_t stream) {
  const std::int64_t tiles = ceil_div(n, TM);
  MEMLOC_REQUIRE(tiles <= 65535, "mask_intersections: too many masks (" + std::to_string(n) + ")");
  const std::int64_t pairs = tiles * (tiles + 1) / 2;
  // Split the words so that about 8 blocks per SM have work; each block at least 2048 words and
  // at most 2^25 (so that a pair's 32-bit count cannot overflow: 2^25 * 32 = 2^30).
  std::int64_t splits = std::max<std::int64_t>(1, ceil_div(8LL * sms, pairs));
  splits = std::min<std::int64_t>(splits, std::max<std::int64_t>(1, n_words / 2048));
  splits = std::max<std::int64_t>(splits, ceil_div(n_words, 1LL << 25));
  splits = std::min<std::int64_t>(splits, 65535);
  const std::int64_t chunk = ceil_div(ceil_div(n_words, splits), kBK) * kBK;
  MEMLOC_REQUIRE(chunk <= (1LL << 26), "mask_intersections: masks too long");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles),
                  static_cast<unsigned>(ceil_div(n_words, chunk)));
  intersections_kernel<TM, MT><<<grid, (TM / MT) * (TM / MT), 0, stream>>>(words, n, n_words, chunk, out);
  MEMLOC_CUDA_CHECK_LAUNCH();
}

}  // namespace

void mask_popcount(std::uintptr_t words, std::int64_t rows, std::int64_t n_words, std::int64_t d_in,
                   std::uintptr_t out, std::uintptr_t stream, int device) {
  MEMLOC_REQUIRE(rows >= 0 && n_words >= 0, "mask_popcount: negative size");
  MEMLOC_REQUIRE(d_in < 0 || n_words == ceil_div(d_in, 32),
                 "mask_popcount: n_words must be ceil(d_in / 32)");
  MEMLOC_REQUIRE(rows <= 0x7fffffffLL, "mask_popcount: too many rows");
  if (rows == 0) return;
  MEMLOC_REQUIRE(out != 0, "mask_popcount: null output");
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  auto* out_ptr = reinterpret_cast<unsigned long long*>(out);
  MEMLOC_CUDA_CHECK(cudaMemsetAsync(out_ptr, 0, static_cast<std::size_t>(rows) * sizeof(unsigned long long), s));
  if (n_words == 0) return;
  MEMLOC_REQUIRE(words != 0, "mask_popcount: null words");
  const std::uint32_t last_mask = (d_in >= 0 && d_in % 32 != 0) ? ((1u << (d_in % 32)) - 1u) : 0xffffffffu;
  const bool vec4 = n_words % 4 == 0 && words % 16 == 0;
  const int sms = sm_count(device);
  std::int64_t splits = std::max<std::int64_t>(1, ceil_div(4LL * sms, rows));
  splits = std::min<std::int64_t>(splits, std::max<std::int64_t>(1, n_words / kPopMinChunk));
  splits = std::max<std::int64_t>(splits, ceil_div(n_words, kPopMaxChunk));
  splits = std::min<std::int64_t>(splits, 65535);
  const std::int64_t chunk = ceil_div(ceil_div(n_words, splits), 4) * 4;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(ceil_div(n_words, chunk)));
  const auto* w = reinterpret_cast<const std::uint32_t*>(words);
  if (vec4) {
    popcount_kernel<true><<<grid, kPopThreads, 0, s>>>(w, n_words, chunk, last_mask, out_ptr);
  } else {
    popcount_kernel<false><<<grid, kPopThreads, 0, s>>>(w, n_words, chunk, last_mask, out_ptr);
  }
  MEMLOC_CUDA_CHECK_LAUNCH();
}

void mask_intersections(std::uintptr_t words, std::int64_t n, std::int64_t n_words, std::uintptr_t out,
                        std::uintptr_t stream, int device) {
  MEMLOC_REQUIRE(n >= 0 && n_words >= 0, "mask_intersections: negative size");
  if (n == 0) return;
  MEMLOC_REQUIRE(out != 0, "mask_intersections: null output");
  MEMLOC_REQUIRE(n <= (1LL << 31) / n, "mask_intersections: the output [n, n] is too large");
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  auto* out_ptr = reinterpret_cast<unsigned long long*>(out);
  MEMLOC_CUDA_CHECK(cudaMemsetAsync(out_ptr, 0, static_cast<std::size_t>(n * n) * sizeof(unsigned long long), s));
  if (n_words == 0) return;
  MEMLOC_REQUIRE(words != 0, "mask_intersections: null words");
  const auto* w = reinterpret_cast<const std::uint32_t*>(words);
  const int sms = sm_count(device);
  if (n <= 16) {
    launch_intersections<16, 2>(w, n, n_words, out_ptr, sms, s);  // 64 threads: few masks
  } else {
    launch_intersections<64, 4>(w, n, n_words, out_ptr, sms, s);
  }
}

}  // namespace memloc::cuda
