// accumulate_sumsq: acc[g, j] += sum over the rows of group g of h[row, j]^2, deterministically.
//
// Two stages with a fixed order, so the result depends only on the shapes (not on the GPU, the
// launch configuration or the timing): stage 1 splits each group's rows into chunks of
// kChunkRows; a block sums one chunk for 32 columns, each of its 8 row-lanes over every 8th row
// in order, then the 8 lanes in order; stage 2 adds the chunk partials to acc in chunk order.
// Groups of at most kChunkRows rows skip the partials and stage 1 adds straight into acc.
// No atomics, so no run-to-run differences.
#include "common.cuh"

namespace memloc::cuda {
namespace {

constexpr int kColsPerBlock = 32;
constexpr int kRowLanes = 8;
constexpr std::int64_t kChunkRows = 256;

std::int64_t chunks_per_group(std::int64_t group_size) { return ceil_div(group_size, kChunkRows); }

template <typename TIn, typename TAcc>
__global__ void __launch_bounds__(kColsPerBlock * kRowLanes)
    sumsq_chunk_kernel(const TIn* __restrict__ h, std::int64_t d_in, std::int64_t group_size,
                       std::int64_t n_chunks, TAcc* __restrict__ dst, bool add_to_acc) {
  __shared__ TAcc s_part[kRowLanes][kColsPerBlock + 1];
  const int tx = threadIdx.x % kColsPerBlock;
  const int ty = threadIdx.x / kColsPerBlock;
  const std::int64_t gc = blockIdx.x;  // group * n_chunks + chunk
  const std::int64_t group = gc / n_chunks;
  const std::int64_t chunk = gc % n_chunks;
  const std::int64_t col = static_cast<std::int64_t>(blockIdx.y) * kColsPerBlock + tx;
  const std::int64_t row_begin = group * group_size + chunk * kChunkRows;
  const std::int64_t row_end = min(group * group_size + group_size, row_begin + kChunkRows);

  TAcc sum = 0;
  if (col < d_in) {
#pragma unroll 4
    for (std::int64_t r = row_begin + ty; r < row_end; r += kRowLanes) {
      const TAcc x = to_acc<TAcc>(h[r * d_in + col]);
      sum += x * x;
    }
  }
  s_part[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && col < d_in) {
    TAcc total = s_part[0][tx];
#pragma unroll
    for (int i = 1; i < kRowLanes; ++i) total += s_part[i][tx];
    if (add_to_acc) {
      dst[group * d_in + col] += total;
    } else {
      dst[gc * d_in + col] = total;
    }
  }
}

template <typename TAcc>
__global__ void __launch_bounds__(256)
    sumsq_finish_kernel(const TAcc* __restrict__ partial, std::int64_t groups, std::int64_t n_chunks,
                        std::int64_t d_in, TAcc* __restrict__ acc) {
  const std::int64_t n = groups * d_in;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t group = i / d_in;
    const std::int64_t col = i % d_in;
    const TAcc* p = partial + group * n_chunks * d_in + col;
    TAcc total = 0;
    for (std::int64_t c = 0; c < n_chunks; ++c) total += p[c * d_in];
    acc[i] += total;
  }
}

template <typename TIn, typename TAcc>
void launch(const void* h, std::int64_t rows, std::int64_t d_in, void* acc, std::int64_t group_size, void* workspace,
            int sms, cudaStream_t stream) {
  const std::int64_t groups = rows / group_size;
  const std::int64_t n_chunks = chunks_per_group(group_size);
  const bool direct = n_chunks == 1;
  MEMLOC_REQUIRE(groups * n_chunks <= 0x7fffffffLL, "accumulate_sumsq: too many row chunks");
  MEMLOC_REQUIRE(ceil_div(d_in, kColsPerBlock) <= 65535, "accumulate_sumsq: d_in too large");
  const dim3 grid(static_cast<unsigned>(groups * n_chunks), static_cast<unsigned>(ceil_div(d_in, kColsPerBlock)));
  TAcc* dst = direct ? static_cast<TAcc*>(acc) : static_cast<TAcc*>(workspace);
  sumsq_chunk_kernel<TIn, TAcc><<<grid, kColsPerBlock * kRowLanes, 0, stream>>>(
      static_cast<const TIn*>(h), d_in, group_size, n_chunks, dst, direct);
  MEMLOC_CUDA_CHECK_LAUNCH();
  if (!direct) {
    const std::int64_t n = groups * d_in;
    const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>(ceil_div(n, 256), 32LL * sms));
    sumsq_finish_kernel<TAcc><<<blocks, 256, 0, stream>>>(static_cast<const TAcc*>(workspace), groups, n_chunks, d_in,
                                                          static_cast<TAcc*>(acc));
    MEMLOC_CUDA_CHECK_LAUNCH();
  }
}

template <typename TAcc>
void launch_for_input(DType h_dtype, const void* h, std::int64_t rows, std::int64_t d_in, void* acc,
                      std::int64_t group_size, void* workspace, int sms, cudaStream_t stream) {
  switch (h_dtype) {
    case DType::kFloat16: return launch<__half, TAcc>(h, rows, d_in, acc, group_size, workspace, sms, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16, TAcc>(h, rows, d_in, acc, group_size, workspace, sms, stream);
    case DType::kFloat32: return launch<float, TAcc>(h, rows, d_in, acc, group_size, workspace, sms, stream);
    case DType::kFloat64: return launch<double, TAcc>(h, rows, d_in, acc, group_size, workspace, sms, stream);
  }
}

std::int64_t acc_size(int acc_dtype) {
  MEMLOC_REQUIRE(acc_dtype == static_cast<int>(DType::kFloat32) || acc_dtype == static_cast<int>(DType::kFloat64),
                 "accumulate_sumsq: acc must be float32 or float64");
  return acc_dtype == static_cast<int>(DType::kFloat32) ? 4 : 8;
}

}  // namespace

std::int64_t accumulate_sumsq_workspace_bytes(std::int64_t rows, std::int64_t d_in, std::int64_t group_size,
                                              int acc_dtype) {
  MEMLOC_REQUIRE(rows >= 0 && d_in >= 0 && group_size > 0, "accumulate_sumsq: bad sizes");
  MEMLOC_REQUIRE(rows % group_size == 0, "accumulate_sumsq: group_size must divide rows");
  const std::int64_t n_chunks = chunks_per_group(group_size);
  if (n_chunks == 1) return 0;
  return (rows / group_size) * n_chunks * d_in * acc_size(acc_dtype);
}

void accumulate_sumsq(std::uintptr_t h, int h_dtype, std::int64_t rows, std::int64_t d_in, std::uintptr_t acc,
                      int acc_dtype, std::int64_t group_size, std::uintptr_t workspace,
                      std::int64_t workspace_bytes, std::uintptr_t stream, int device) {
  const DType in = checked_dtype(h_dtype, "accumulate_sumsq h", /*allow_float64=*/true);
  const std::int64_t needed = accumulate_sumsq_workspace_bytes(rows, d_in, group_size, acc_dtype);
  if (rows == 0 || d_in == 0) return;
  MEMLOC_REQUIRE(h != 0 && acc != 0, "accumulate_sumsq: null pointer");
  MEMLOC_REQUIRE(workspace_bytes >= needed && (needed == 0 || workspace != 0),
                 "accumulate_sumsq: workspace of " + std::to_string(needed) + " bytes needed, got " +
                     std::to_string(workspace_bytes));
  DeviceGuard guard(device);
  const int sms = sm_count(device);
  const cudaStream_t s = as_stream(stream);
  auto* ws = reinterpret_cast<void*>(workspace);
  const auto* hp = reinterpret_cast<const void*>(h);
  auto* ap = reinterpret_cast<void*>(acc);
  if (acc_dtype == static_cast<int>(DType::kFloat32)) {
    launch_for_input<float>(in, hp, rows, d_in, ap, group_size, ws, sms, s);
  } else {
    launch_for_input<double>(in, hp, rows, d_in, ap, group_size, ws, sms, s);
  }
}

}  // namespace memloc::cuda
