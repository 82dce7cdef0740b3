// Per-feature sums of squares of activations (eq. 2/4's ||X_j||^2), plain and fused with GEGLU.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "cpu/float_bits.h"
#include "cpu/kernels.h"

namespace memloc {
namespace cpu {
namespace {

struct Double {
  using storage = double;
  static double load(double v) { return v; }
  static double store(double v) { return v; }
};

// Columns per task: the float64 partial sums of one task (2 KiB) stay in L1 while rows stream by.
constexpr int64_t kCols = 256;
// Row blocks: at least this many rows each, at most kMaxBlocks per group. Block boundaries
// depend only on group_size, so the summation order (hence every bit of the result) is the
// same for any thread count.
constexpr int64_t kMinRowsPerBlock = 1024;
constexpr int64_t kMaxBlocks = 64;

template <typename T>
inline double load_double(typename T::storage v) {
  return static_cast<double>(T::load(v));
}

// part[0:nc] = sum over rows [r0, r1) of h[r, c0:c0+nc]^2, in float64 (squares of f16/bf16/f32
// are exact in float64; only the additions round, at 2^-53).
template <typename T>
void block_sumsq(const typename T::storage* h, int64_t d_in, int64_t r0, int64_t r1, int64_t c0, int64_t nc,
                 double* part) {
  for (int64_t j = 0; j < nc; ++j) part[j] = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const typename T::storage* row = h + r * d_in + c0;
    for (int64_t j = 0; j < nc; ++j) {
      const double x = load_double<T>(row[j]);
      part[j] += x * x;
    }
  }
}

template <typename T, typename Acc>
void accumulate_impl(const typename T::storage* h, int64_t rows, int64_t d_in, Acc* acc, int64_t group_size,
                     int threads) {
  const int64_t groups = rows / group_size;
  const int64_t rows_per_block = std::max(kMinRowsPerBlock, (group_size + kMaxBlocks - 1) / kMaxBlocks);
  const int64_t blocks = (group_size + rows_per_block - 1) / rows_per_block;
  const int64_t col_chunks = (d_in + kCols - 1) / kCols;
  const int nt = resolve_threads(threads);
  (void)nt;  // used by the OpenMP pragmas only

  if (blocks == 1) {
    MEMLOC_OMP(parallel for schedule(static) num_threads(nt))
    for (int64_t task = 0; task < groups * col_chunks; ++task) {
      const int64_t g = task / col_chunks;
      const int64_t c0 = (task % col_chunks) * kCols;
      const int64_t nc = std::min(kCols, d_in - c0);
      double part[kCols];
      block_sumsq<T>(h, d_in, g * group_size, (g + 1) * group_size, c0, nc, part);
      Acc* out = acc + g * d_in + c0;
      for (int64_t j = 0; j < nc; ++j) out[j] = static_cast<Acc>(static_cast<double>(out[j]) + part[j]);
    }
    return;
  }

  // Stage 1: one float64 partial per (group, row block, column); stage 2 adds the blocks in order.
  std::vector<double> partials(static_cast<size_t>(groups * blocks * d_in));
  MEMLOC_OMP(parallel num_threads(nt))
  {
    MEMLOC_OMP(for schedule(static))
    for (int64_t task = 0; task < groups * blocks * col_chunks; ++task) {
      const int64_t gb = task / col_chunks;
      const int64_t g = gb / blocks;
      const int64_t b = gb % blocks;
      const int64_t c0 = (task % col_chunks) * kCols;
      const int64_t nc = std::min(kCols, d_in - c0);
      const int64_t r0 = g * group_size + b * rows_per_block;
      const int64_t r1 = std::min(g * group_size + group_size, r0 + rows_per_block);
      block_sumsq<T>(h, d_in, r0, r1, c0, nc, partials.data() + gb * d_in + c0);
    }
    MEMLOC_OMP(for schedule(static))
    for (int64_t task = 0; task < groups * col_chunks; ++task) {
      const int64_t g = task / col_chunks;
      const int64_t c0 = (task % col_chunks) * kCols;
      const int64_t nc = std::min(kCols, d_in - c0);
      Acc* out = acc + g * d_in + c0;
      for (int64_t j = 0; j < nc; ++j) {
        double total = 0.0;
        for (int64_t b = 0; b < blocks; ++b) total += partials[(g * blocks + b) * d_in + c0 + j];
        out[j] = static_cast<Acc>(static_cast<double>(out[j]) + total);
      }
    }
  }
}

template <typename T>
void accumulate_typed(const void* h, int64_t rows, int64_t d_in, void* acc, int acc_dtype, int64_t group_size,
                      int threads) {
  const auto* hp = static_cast<const typename T::storage*>(h);
  if (acc_dtype == kFloat32) {
    accumulate_impl<T>(hp, rows, d_in, static_cast<float*>(acc), group_size, threads);
  } else if (acc_dtype == kFloat64) {
    accumulate_impl<T>(hp, rows, d_in, static_cast<double*>(acc), group_size, threads);
  } else {
    bad_dtype("accumulate_sumsq acc", acc_dtype);
  }
}

// torch's erf GELU, 0.5 * x * (1 + erf(x / sqrt(2))), in float32 for f16/bf16/f32 inputs (as
// torch computes reduced-precision GELU) and each step rounded to T: gelu(gate) is rounded before
// the product with hidden, and the product is rounded again.
template <typename T>
void geglu_impl(const typename T::storage* proj, int64_t rows, int64_t d_ff, typename T::storage* h, int threads) {
  const float alpha = static_cast<float>(0.70710678118654752440);
  MEMLOC_OMP(parallel for schedule(static) num_threads(resolve_threads(threads)))
  for (int64_t r = 0; r < rows; ++r) {
    const typename T::storage* hidden = proj + r * 2 * d_ff;
    const typename T::storage* gate = hidden + d_ff;
    typename T::storage* out = h + r * d_ff;
    for (int64_t j = 0; j < d_ff; ++j) {
      const float x = T::load(gate[j]);
      const float gelu = T::load(T::store(0.5f * x * (1.0f + std::erf(x * alpha))));
      out[j] = T::store(T::load(hidden[j]) * gelu);
    }
  }
}

void geglu_double(const double* proj, int64_t rows, int64_t d_ff, double* h, int threads) {
  const double alpha = 0.70710678118654752440;
  MEMLOC_OMP(parallel for schedule(static) num_threads(resolve_threads(threads)))
  for (int64_t r = 0; r < rows; ++r) {
    const double* hidden = proj + r * 2 * d_ff;
    const double* gate = hidden + d_ff;
    double* out = h + r * d_ff;
    for (int64_t j = 0; j < d_ff; ++j) {
      const double x = gate[j];
      out[j] = hidden[j] * (0.5 * x * (1.0 + std::erf(x * alpha)));
    }
  }
}

void check_groups(const char* op, int64_t rows, int64_t group_size) {
  if (group_size <= 0 || rows % group_size != 0) {
    throw std::invalid_argument(std::string(op) + ": group_size " + std::to_string(group_size) +
                                " must be positive and divide rows " + std::to_string(rows));
  }
}

}  // namespace

void accumulate_sumsq(const void* h, int h_dtype, int64_t rows, int64_t d_in, void* acc, int acc_dtype,
                      int64_t group_size, int threads) {
  check_groups("accumulate_sumsq", rows, group_size);
  if (rows == 0 || d_in == 0) return;
  switch (h_dtype) {
    case kFloat16: return accumulate_typed<Half>(h, rows, d_in, acc, acc_dtype, group_size, threads);
    case kBFloat16: return accumulate_typed<BFloat16>(h, rows, d_in, acc, acc_dtype, group_size, threads);
    case kFloat32: return accumulate_typed<Float>(h, rows, d_in, acc, acc_dtype, group_size, threads);
    case kFloat64: return accumulate_typed<Double>(h, rows, d_in, acc, acc_dtype, group_size, threads);
    default: bad_dtype("accumulate_sumsq h", h_dtype);
  }
}

void geglu_sumsq(const void* proj_out, int dtype, int64_t rows, int64_t d_ff, void* h, void* acc, int acc_dtype,
                 int64_t group_size, int threads) {
  check_groups("geglu_sumsq", rows, group_size);
  if (rows == 0 || d_ff == 0) return;
  switch (dtype) {
    case kFloat16:
      geglu_impl<Half>(static_cast<const uint16_t*>(proj_out), rows, d_ff, static_cast<uint16_t*>(h), threads);
      break;
    case kBFloat16:
      geglu_impl<BFloat16>(static_cast<const uint16_t*>(proj_out), rows, d_ff, static_cast<uint16_t*>(h), threads);
      break;
    case kFloat32:
      geglu_impl<Float>(static_cast<const float*>(proj_out), rows, d_ff, static_cast<float*>(h), threads);
      break;
    case kFloat64:
      geglu_double(static_cast<const double*>(proj_out), rows, d_ff, static_cast<double*>(h), threads);
      break;
    default: bad_dtype("geglu_sumsq proj_out", dtype);
  }
  accumulate_sumsq(h, dtype, rows, d_ff, acc, acc_dtype, group_size, threads);
}

}  // namespace cpu
}  // namespace memloc
