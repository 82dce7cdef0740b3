// wanda_scores: out[s, r, j] = |float(W[r, j])| * norms[s, j], eq. 2/4, in float32.
//
// norms are the IEEE square roots of sumsq taken in Python by torch, and the product is one
// correctly rounded float32 multiply, so the scores are the reference's bits. One thread per
// column of one row of one subset; rows and subsets are walked with grid strides.
#include <algorithm>

#include "common.cuh"

namespace memloc::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    wanda_scores_kernel(const T* __restrict__ weight, const float* __restrict__ norms, std::int64_t S,
                        std::int64_t d_out, std::int64_t d_in, float* __restrict__ out) {
  const std::int64_t col = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= d_in) return;
  for (std::int64_t s = blockIdx.z; s < S; s += gridDim.z) {
    const float norm = __ldg(norms + s * d_in + col);
    for (std::int64_t row = blockIdx.y; row < d_out; row += gridDim.y) {
      const float w = fabsf(to_float<T>(__ldg(weight + row * d_in + col)));
      out[(s * d_out + row) * d_in + col] = __fmul_rn(w, norm);
    }
  }
}

template <typename T>
void launch(const void* weight, const float* norms, std::int64_t S, std::int64_t d_out, std::int64_t d_in,
            float* out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(d_in, kThreads)),
                  static_cast<unsigned>(std::min<std::int64_t>(d_out, 65535)),
                  static_cast<unsigned>(std::min<std::int64_t>(S, 65535)));
  wanda_scores_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(weight), norms, S, d_out, d_in, out);
  MEMLOC_CUDA_CHECK_LAUNCH();
}

}  // namespace

void wanda_scores(std::uintptr_t weight, int dtype, std::int64_t d_out, std::int64_t d_in, std::uintptr_t norms,
                  std::int64_t S, std::uintptr_t out, std::uintptr_t stream, int device) {
  const DType dt = checked_dtype(dtype, "wanda_scores weight", /*allow_float64=*/false);
  MEMLOC_REQUIRE(d_out >= 0 && d_in >= 0 && S >= 0, "wanda_scores: negative size");
  MEMLOC_REQUIRE(ceil_div(d_in, kThreads) <= 0x7fffffffLL, "wanda_scores: d_in too large");
  if (d_out == 0 || d_in == 0 || S == 0) return;
  MEMLOC_REQUIRE(weight != 0 && norms != 0 && out != 0, "wanda_scores: null pointer");
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  const auto* w = reinterpret_cast<const void*>(weight);
  const auto* n = reinterpret_cast<const float*>(norms);
  auto* o = reinterpret_cast<float*>(out);
  switch (dt) {
    case DType::kFloat16: return launch<__half>(w, n, S, d_out, d_in, o, s);
    case DType::kBFloat16: return launch<__nv_bfloat16>(w, n, S, d_out, d_in, o, s);
    case DType::kFloat32: return launch<float>(w, n, S, d_out, d_in, o, s);
    default: throw std::invalid_argument("wanda_scores: weight must be float16, bfloat16 or float32");
  }
}

}  // namespace memloc::cuda
