// pair_norm_maxima: out[i] = max(|n[2i]|, |n[2i + 1]|) of float32 norms, NaN where either is not
// finite. The warp kernel of memorized_mask bounds the scores of a column pair by this times the
// pair's largest |W| (its bound path, mask_warp.cuh); a NaN bound lists the block whatever comes.
#include <algorithm>

#include "common.cuh"

namespace memloc::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float pair_max(float a, float b) {
  a = fabsf(a);
  b = fabsf(b);
  return isfinite(a) && isfinite(b) ? fmaxf(a, b) : __int_as_float(0x7fffffff);
}

// Two pairs per thread (16-byte loads, 8-byte stores); n_pairs even.
__global__ void __launch_bounds__(kThreads)
    pair_maxima_kernel(const float4* __restrict__ in, float2* __restrict__ out, std::int64_t n_quads) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n_quads; i += stride) {
    const float4 v = __ldg(in + i);
    out[i] = make_float2(pair_max(v.x, v.y), pair_max(v.z, v.w));
  }
}

}  // namespace

void pair_norm_maxima(std::uintptr_t norms, std::int64_t n_pairs, std::uintptr_t out, std::uintptr_t stream,
                      int device) {
  MEMLOC_REQUIRE(n_pairs >= 0 && n_pairs % 2 == 0, "pair_norm_maxima: n_pairs must be even and >= 0");
  if (n_pairs == 0) return;
  MEMLOC_REQUIRE(norms % 16 == 0 && out % 8 == 0, "pair_norm_maxima: norms must be 16-byte, out 8-byte aligned");
  DeviceGuard guard(device);
  const std::int64_t quads = n_pairs / 2;
  const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>(ceil_div(quads, kThreads), 8L * sm_count(device)));
  pair_maxima_kernel<<<blocks, kThreads, 0, as_stream(stream)>>>(reinterpret_cast<const float4*>(norms),
                                                                 reinterpret_cast<float2*>(out), quads);
  MEMLOC_CUDA_CHECK_LAUNCH();
}

}  // namespace memloc::cuda
