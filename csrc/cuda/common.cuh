// Shared by the CUDA kernels: error checks, the device guard, element loads and warp helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ops.h"

// Throws std::runtime_error("file:line: expr: <CUDA error>") when a CUDA runtime call fails.
#define MEMLOC_CUDA_CHECK(expr)                                                                   \
  do {                                                                                            \
    const cudaError_t memloc_err_ = (expr);                                                       \
    if (memloc_err_ != cudaSuccess) {                                                             \
      throw std::runtime_error(std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": " +   \
                               #expr + " failed: " + cudaGetErrorName(memloc_err_) + ": " +       \
                               cudaGetErrorString(memloc_err_));                                  \
    }                                                                                             \
  } while (0)

// After every <<<...>>> launch: a bad configuration is only reported by cudaGetLastError.
#define MEMLOC_CUDA_CHECK_LAUNCH() MEMLOC_CUDA_CHECK(cudaGetLastError())

// Throws std::invalid_argument (ValueError in Python) with a message when `cond` is false.
#define MEMLOC_REQUIRE(cond, msg)                        \
  do {                                                   \
    if (!(cond)) throw std::invalid_argument(msg);       \
  } while (0)

namespace memloc::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Makes `device` current for the lifetime of the guard and restores the previous one. The
// module links its own (static) CUDA runtime; both runtimes bind the device's primary context,
// so torch's pointers and streams are valid here once the right device is current.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  int device_ = -1;
};

// Number of multiprocessors of `device` (cached); launch heuristics only, never results.
int sm_count(int device);

inline cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// Validates a dtype code and returns it as DType.
DType checked_dtype(int code, const char* what, bool allow_float64);

inline std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }

// h's element converted exactly to the accumulator type (every f16/bf16/f32 value is exact in
// f32; an f64 input with an f32 accumulator rounds, as the reference's .to(float32) does).
template <typename TAcc, typename T>
__device__ __forceinline__ TAcc to_acc(T x) {
  return static_cast<TAcc>(to_float<T>(x));
}
template <>
__device__ __forceinline__ float to_acc<float, double>(double x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ double to_acc<double, double>(double x) { return x; }

__device__ __forceinline__ unsigned lanemask_lt(int lane) { return (1u << lane) - 1u; }

// Inclusive sum of one int per lane over the (full) warp.
__device__ __forceinline__ int warp_inclusive_sum(int value, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int other = __shfl_up_sync(kFullMask, value, d);
    if (lane >= d) value += other;
  }
  return value;
}

// The fields every memorized_mask launcher copies from MaskLayerArgs into its kernel's layer table
// (pointers, d_out, d_in, k, T); each adds its own (row or item offsets, S, spans).
template <typename Layer>
inline void fill_mask_layer(Layer& l, const MaskLayerArgs& a) {
  l.weight = reinterpret_cast<const void*>(a.weight);
  l.norms = reinterpret_cast<const float*>(a.norms);
  l.null_norms = reinterpret_cast<const float*>(a.null_norms);
  l.out = reinterpret_cast<std::uint32_t*>(a.out);
  l.d_out = static_cast<int>(a.d_out);
  l.d_in = static_cast<int>(a.d_in);
  l.k = static_cast<int>(a.k);
  l.T = static_cast<int>(a.T);
}

}  // namespace memloc::cuda
