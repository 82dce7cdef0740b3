// apply_mask / restore in place: removed values compacted in row-major order, copied as raw bits.
//
// The caller provides offsets[r], the exclusive scan of the per-row popcounts (mask_popcount
// with d_in), so rows are independent: one block per row walks the row's words in chunks of
// one word per thread, scans the word popcounts across the block, and each thread moves the
// values of its word's set bits in column order to/from removed[offsets[r] + rank]. Elements
// are moved as 16/32/64-bit integers, never through float arithmetic, so NaN payloads and
// signed zeros survive; apply writes +0.0 (all bits zero) where it removes a value.
#include "common.cuh"

namespace memloc::cuda {
namespace {

constexpr int kThreads = 128;

// Exclusive scan of one int per thread over the block; also returns the block total.
__device__ __forceinline__ int block_exclusive_scan(int value, int* s_warp, int& total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int inclusive = warp_inclusive_sum(value, lane);
  if (lane == 31) s_warp[warp] = inclusive;
  __syncthreads();
  int warp_offset = 0;
  total = 0;
  for (int w = 0; w < kThreads / 32; ++w) {
    if (w < warp) warp_offset += s_warp[w];
    total += s_warp[w];
  }
  __syncthreads();  // s_warp is rewritten by the next call
  return warp_offset + inclusive - value;
}

template <typename U, bool kRestore>
__global__ void __launch_bounds__(kThreads)
    prune_kernel(U* __restrict__ weight, const std::uint32_t* __restrict__ words,
                 const long long* __restrict__ offsets, U* __restrict__ removed, std::int64_t d_in,
                 std::int64_t n_words) {
  __shared__ int s_warp[kThreads / 32];
  const std::int64_t row = blockIdx.x;
  const std::uint32_t last_mask = (d_in % 32 != 0) ? ((1u << (d_in % 32)) - 1u) : 0xffffffffu;
  const std::uint32_t* row_words = words + row * n_words;
  U* row_weight = weight + row * d_in;
  long long base = offsets[row];
  for (std::int64_t w0 = 0; w0 < n_words; w0 += kThreads) {
    const std::int64_t wi = w0 + threadIdx.x;
    std::uint32_t word = wi < n_words ? row_words[wi] : 0u;
    if (wi == n_words - 1) word &= last_mask;  // bits past d_in are not part of the mask
    int total = 0;
    long long pos = base + block_exclusive_scan(__popc(word), s_warp, total);
    while (word != 0u) {
      const int bit = __ffs(word) - 1;
      word &= word - 1u;
      U* p = row_weight + wi * 32 + bit;
      if (kRestore) {
        *p = removed[pos];
      } else {
        removed[pos] = *p;
        *p = U(0);
      }
      ++pos;
    }
    base += total;
  }
}

template <typename U>
void launch(bool restore, void* weight, std::int64_t d_out, std::int64_t d_in, const void* words,
            const void* offsets, void* removed, cudaStream_t stream) {
  const std::int64_t n_words = ceil_div(d_in, 32);
  auto* w = static_cast<U*>(weight);
  const auto* m = static_cast<const std::uint32_t*>(words);
  const auto* o = static_cast<const long long*>(offsets);
  auto* r = static_cast<U*>(removed);
  const unsigned grid = static_cast<unsigned>(d_out);
  if (restore) {
    prune_kernel<U, true><<<grid, kThreads, 0, stream>>>(w, m, o, r, d_in, n_words);
  } else {
    prune_kernel<U, false><<<grid, kThreads, 0, stream>>>(w, m, o, r, d_in, n_words);
  }
  MEMLOC_CUDA_CHECK_LAUNCH();
}

}  // namespace

void apply_mask(std::uintptr_t weight, int dtype, std::int64_t d_out, std::int64_t d_in, std::uintptr_t words,
                std::uintptr_t offsets, std::uintptr_t removed, bool restore, std::uintptr_t stream, int device) {
  const DType dt = checked_dtype(dtype, "apply_mask weight", /*allow_float64=*/true);
  MEMLOC_REQUIRE(d_out >= 0 && d_in >= 0, "apply_mask: negative size");
  MEMLOC_REQUIRE(d_out <= 0x7fffffffLL, "apply_mask: too many rows");
  if (d_out == 0 || d_in == 0) return;
  MEMLOC_REQUIRE(weight != 0 && words != 0 && offsets != 0, "apply_mask: null pointer");
  // removed may be null only when nothing is removed; the kernel never touches it then.
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  auto* w = reinterpret_cast<void*>(weight);
  const auto* m = reinterpret_cast<const void*>(words);
  const auto* o = reinterpret_cast<const void*>(offsets);
  auto* r = reinterpret_cast<void*>(removed);
  switch (dt) {
    case DType::kFloat16:
    case DType::kBFloat16: return launch<std::uint16_t>(restore, w, d_out, d_in, m, o, r, s);
    case DType::kFloat32: return launch<std::uint32_t>(restore, w, d_out, d_in, m, o, r, s);
    case DType::kFloat64: return launch<std::uint64_t>(restore, w, d_out, d_in, m, o, r, s);
  }
}

}  // namespace memloc::cuda
