// memorized_mask: exact per-row top-k of |W| * norms with the null comparison, OR-ed into packed masks.
//
// One block holds one weight row in registers (|W| of E elements per lane; lane l of warp w owns
// columns w*32*E + e*32 + l) and loops over the S x T norm vectors, so W is read once per batch.
// Per vector:
//  1. a filter threshold tau0 from the lane maxima (a warp bitonic sort, then the minimum over
//     warps) that provably leaves at least k candidates (score >= tau0);
//  2. the candidates are compacted into shared memory (a warp scan, one atomic per warp) as
//     64-bit keys (score bits << 32 | ~column: among equal scores the lower column is larger);
//  3. an exact rank count among the candidates picks the top k; the null comparison runs on
//     those only; their bits are OR-ed into a shared bitmap holding the union over T, which is
//     OR-ed into `out` once per subset.
// When the filter leaves too many candidates (large k, planted ties, d_in < 32), an exact
// block-wide radix select over the whole row runs instead (slower, same result).
#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"
#include "mask_thread.h"
#include "mask_warp.h"

namespace memloc::cuda {
namespace {

constexpr int kMaxWarps = 16;                      // 512 threads per block at most
constexpr int kMaxE = 32;                          // elements per lane at most (a 32-bit mask)
constexpr int kMaxCols = kMaxWarps * 32 * kMaxE;   // 16384: the largest d_in
constexpr int kMaxWords = kMaxCols / 32;
constexpr int kColBits = 15;                       // every column index < 2^15
constexpr int kCandCap = 256;                      // candidates the rank pass keeps
constexpr int kMaxLayers = 64;                     // layers in one launch's parameter table
static_assert(kMaxCols <= (1 << kColBits), "column indices must fit kColBits");

struct Layer {
  const void* weight;
  const float* norms;
  const float* null_norms;
  std::uint32_t* out;
  int d_out, d_in, k, S, T;
  int row_begin;  // first global row of this layer in the launch
};

struct Launch {
  Layer layers[kMaxLayers];
  int n_layers;
  int n_rows;       // sum of the layers' d_out
  int s_per_block;  // subsets handled by one blockIdx.y
};
// Kernel parameters are limited to 4 KB on the oldest toolchains this might meet.
static_assert(sizeof(Launch) <= 4000, "the layer table must fit the kernel parameter space");

// Ascending bitonic sort of one value per lane; returns this lane's value of the sorted order.
__device__ __forceinline__ std::uint32_t warp_sort_ascending(std::uint32_t v, int lane) {
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      const std::uint32_t other = __shfl_xor_sync(kFullMask, v, stride);
      const bool ascending = (lane & size) == 0;
      const bool lower = (lane & stride) == 0;
      v = (lower == ascending) ? min(v, other) : max(v, other);
    }
  }
  return v;
}

// Sum of one int per thread over the block. Double-buffered partials: one barrier per call.
__device__ __forceinline__ int block_sum(int local, int (*s_red)[kMaxWarps], int& parity, int warp, int lane,
                                         int n_warps) {
  const int warp_total = __reduce_add_sync(kFullMask, local);
  int* buf = s_red[parity];
  parity ^= 1;
  if (lane == 0) buf[warp] = warp_total;
  __syncthreads();
  int total = 0;
  for (int i = 0; i < n_warps; ++i) total += buf[i];
  return total;
}

template <typename T>
__device__ __forceinline__ float load_abs(const T* p) {
  return fabsf(to_float<T>(__ldg(p)));
}

// The bits of a score |w| * |norm| (the reference's float32 product; |norm| so that a -0.0
// statistic, whose root is -0.0, scores +0.0 instead of 0x80000000, above every score).
__device__ __forceinline__ std::uint32_t score_bits(float wabs, float norm) {
  return __float_as_uint(__fmul_rn(wabs, fabsf(norm)));
}

// The row as one lane sees it: |W| of its E elements in registers (element e is column
// col0 + 32 e; elements e >= n_valid pad the row and score 0). Scores are recomputed from the
// (L1-resident) norms in each pass instead of being kept in registers, so that 32 elements per
// lane fit without spills; each pass is branch-free so all E loads are in flight at once.
// kPadded selects the variant for the warp that owns padding (predicated loads).
template <int E>
struct LaneRow {
  float wabs[E];
  int col0;     // column of element 0
  int n_valid;  // elements e < n_valid are real columns
  bool padded;  // this warp owns padding (warp-uniform)

  template <bool kPadded>
  __device__ __forceinline__ std::uint32_t score(int e, const float* row_norms) const {
    if (!kPadded) return score_bits(wabs[e], __ldg(row_norms + col0 + e * 32));
    const float norm = e < n_valid ? __ldg(row_norms + col0 + e * 32) : 0.f;  // a predicated load
    return score_bits(wabs[e], norm);  // padding: |W| = 0, so the score is 0
  }

  // Largest score bits of this lane (non-negative floats, and NaN above +inf, order like uint32).
  template <bool kPadded>
  __device__ __forceinline__ std::uint32_t max_score_impl(const float* row_norms) const {
    std::uint32_t best = 0u;
#pragma unroll
    for (int e = 0; e < E; ++e) best = max(best, score<kPadded>(e, row_norms));
    return best;
  }

  // Bit e set when element e is a real column with score >= tau (E <= 32).
  template <bool kPadded>
  __device__ __forceinline__ std::uint32_t at_least_impl(std::uint32_t tau, const float* row_norms) const {
    std::uint32_t bits = 0u;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const bool hit = score<kPadded>(e, row_norms) >= tau && (!kPadded || e < n_valid);
      bits |= hit ? (1u << e) : 0u;
    }
    return bits;
  }

  // Counts of real elements with score > tau and == tau.
  template <bool kPadded>
  __device__ __forceinline__ void count_around_impl(std::uint32_t tau, const float* row_norms, int& above,
                                                    int& equal) const {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const std::uint32_t key = score<kPadded>(e, row_norms);
      const bool real = !kPadded || e < n_valid;
      above += (real && key > tau) ? 1 : 0;
      equal += (real && key == tau) ? 1 : 0;
    }
  }

  // Number of real elements with score == tau and column < limit.
  template <bool kPadded>
  __device__ __forceinline__ int count_equal_before_impl(std::uint32_t tau, std::uint32_t limit,
                                                         const float* row_norms) const {
    int n = 0;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const bool real = !kPadded || e < n_valid;
      const std::uint32_t col = static_cast<std::uint32_t>(col0 + e * 32);
      n += (real && score<kPadded>(e, row_norms) == tau && col < limit) ? 1 : 0;
    }
    return n;
  }

  // The passes, for this warp's variant. `padded` is warp-uniform and the branches hold no
  // barrier, so every warp of the block meets the same __syncthreads() calls.
  __device__ __forceinline__ std::uint32_t max_score(const float* row_norms) const {
    return padded ? max_score_impl<true>(row_norms) : max_score_impl<false>(row_norms);
  }
  __device__ __forceinline__ std::uint32_t at_least(std::uint32_t tau, const float* row_norms) const {
    return padded ? at_least_impl<true>(tau, row_norms) : at_least_impl<false>(tau, row_norms);
  }
  __device__ __forceinline__ void count_around(std::uint32_t tau, const float* row_norms, int& above,
                                               int& equal) const {
    if (padded) {
      count_around_impl<true>(tau, row_norms, above, equal);
    } else {
      count_around_impl<false>(tau, row_norms, above, equal);
    }
  }
  __device__ __forceinline__ int count_equal_before(std::uint32_t tau, std::uint32_t limit,
                                                    const float* row_norms) const {
    return padded ? count_equal_before_impl<true>(tau, limit, row_norms)
                  : count_equal_before_impl<false>(tau, limit, row_norms);
  }
  __device__ __forceinline__ std::uint32_t score_any(int e, const float* row_norms) const {
    return padded ? score<true>(e, row_norms) : score<false>(e, row_norms);
  }
};

// Per vector, per row: the mask of the exact top-k (ties to the lower column) AND score > null
// score, OR-ed into s_bits. Returns nothing; every thread of the block must call it.
template <typename T, int E>
__device__ __forceinline__ void select_row(const LaneRow<E>& lr, const T* wrow, const float* row_norms,
                                           const float* row_null_norms, int k, int c, int n_full,
                                           bool use_filter, int cap, unsigned long long* s_cand, float* s_null,
                                           std::uint32_t* s_bits, std::uint32_t* s_warp_thr, int (*s_red)[kMaxWarps],
                                           int* s_count) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int n_warps = blockDim.x >> 5;
  const int n_threads = blockDim.x;

  if (use_filter) {
    // The filter: warp w (if all its lanes own a real column) takes tau_w = the c-th largest of
    // its lane maxima, so >= c of its real elements are >= tau_w; with c * n_full >= k, at least
    // k elements are >= tau0 = min_w tau_w, so tau0 <= the k-th largest score and every top-k
    // element is a candidate (score >= tau0). Any element ranked above a candidate is itself a
    // candidate, so the rank among candidates is the rank in the row.
    const std::uint32_t lane_max = lr.max_score(row_norms);
    const std::uint32_t sorted = warp_sort_ascending(lane_max, lane);
    const std::uint32_t tau_w = __shfl_sync(kFullMask, sorted, 32 - c);
    if (tid == 0) *s_count = 0;
    if (lane == 0 && warp < n_full) s_warp_thr[warp] = tau_w;
    __syncthreads();
    std::uint32_t tau0 = 0xffffffffu;
    for (int i = 0; i < n_full; ++i) tau0 = min(tau0, s_warp_thr[i]);

    // Compaction: one shared atomic per warp; each lane then writes its own candidates.
    std::uint32_t mine = lr.at_least(tau0, row_norms);
    const int n_mine = __popc(mine);
    const int before = warp_inclusive_sum(n_mine, lane);  // of the candidate counts
    const int warp_total = __shfl_sync(kFullMask, before, 31);
    int base = 0;
    if (lane == 31 && warp_total > 0) base = atomicAdd(s_count, warp_total);
    int slot = __shfl_sync(kFullMask, base, 31) + before - n_mine;
    while (mine != 0u) {
      const int e = __ffs(mine) - 1;
      mine &= mine - 1u;
      if (slot < cap) {
        // Reload rather than index the register array with a run-time e: the same bits. The
        // null norm is loaded here too, in parallel, not after the ranking.
        const std::uint32_t col = static_cast<std::uint32_t>(lr.col0 + e * 32);
        const float w = load_abs(wrow + col);
        const std::uint32_t key = score_bits(w, __ldg(row_norms + col));
        s_cand[slot] = (static_cast<unsigned long long>(key) << 32) | static_cast<std::uint32_t>(~col);
        s_null[slot] = __fmul_rn(w, __ldg(row_null_norms + col));
      }
      ++slot;
    }
    __syncthreads();
    const int n_cand = *s_count;
    if (n_cand >= k && n_cand <= cap) {  // n_cand >= k holds by construction; checked anyway
      for (int i = tid; i < n_cand; i += n_threads) {
        const unsigned long long me = s_cand[i];
        int rank = 0;
#pragma unroll 4
        for (int j = 0; j < n_cand; ++j) rank += s_cand[j] > me ? 1 : 0;
        if (rank < k) {
          const std::uint32_t col = ~static_cast<std::uint32_t>(me);
          const float score = __uint_as_float(static_cast<std::uint32_t>(me >> 32));
          if (score > s_null[i]) atomicOr(&s_bits[col >> 5], 1u << (col & 31));
        }
      }
      return;
    }
  }

  // Exact radix select over the whole row (too many candidates: large k or planted ties).
  // tau = the largest value with count(score >= tau) >= k, i.e. the k-th largest score; then the
  // first `need` columns among the scores equal to tau.
  int parity = 0;
  std::uint32_t tau = 0u;
  for (int bit = 30; bit >= 0; --bit) {  // bit 31 (the sign) is 0 in every score
    const std::uint32_t probe = tau | (1u << bit);
    const int local = __popc(lr.at_least(probe, row_norms));
    if (block_sum(local, s_red, parity, warp, lane, n_warps) >= k) tau = probe;
  }
  int local_gt = 0, local_eq = 0;
  lr.count_around(tau, row_norms, local_gt, local_eq);
  const int need = k - block_sum(local_gt, s_red, parity, warp, lane, n_warps);
  const int n_equal = block_sum(local_eq, s_red, parity, warp, lane, n_warps);
  std::uint32_t last_col = 0xffffffffu;  // equal scores with column <= last_col are taken
  if (n_equal > need) {
    // The largest x with #(score == tau, col < x) < need; then exactly `need` have col <= x.
    std::uint32_t x = 0u;
    for (int bit = kColBits - 1; bit >= 0; --bit) {
      const std::uint32_t probe = x | (1u << bit);
      const int local = lr.count_equal_before(tau, probe, row_norms);
      if (block_sum(local, s_red, parity, warp, lane, n_warps) < need) x = probe;
    }
    last_col = x;
  }
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const std::uint32_t col = static_cast<std::uint32_t>(lr.col0 + e * 32);
    const std::uint32_t key = lr.score_any(e, row_norms);
    bool take = e < lr.n_valid && (key > tau || (key == tau && col <= last_col));
    if (take) take = __uint_as_float(key) > __fmul_rn(lr.wabs[e], __ldg(row_null_norms + col));
    const unsigned word = __ballot_sync(kFullMask, take);
    if (lane == 0 && word != 0u) atomicOr(&s_bits[warp * E + e], word);
  }
}

// Layer of global row `row`, scanning forward from `li` (rows only grow within a block).
__device__ __forceinline__ int layer_of(const Launch& launch, int row, int li) {
  while (li + 1 < launch.n_layers && row >= launch.layers[li + 1].row_begin) ++li;
  return li;
}

// Asks L2 for a whole weight row ahead of use (no registers held, no fault past the row).
template <typename T>
__device__ __forceinline__ void prefetch_row_l2(const T* row, int d_in) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int n_bytes = d_in * static_cast<int>(sizeof(T));
  for (int offset = static_cast<int>(threadIdx.x) * 128; offset < n_bytes; offset += blockDim.x * 128) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(bytes + offset));
  }
}

// Persistent blocks: blockIdx.x walks the launch's rows with stride gridDim.x (prefetching its
// next row into L2 while it works on this one); blockIdx.y picks a range of subsets.
template <typename T, int E>
__global__ void __launch_bounds__(kMaxWarps * 32, 1)
    memorized_mask_kernel(const __grid_constant__ Launch launch) {
  __shared__ unsigned long long s_cand[kCandCap];  // (score bits << 32) | ~column
  __shared__ float s_null[kCandCap];                // null score of each candidate
  __shared__ std::uint32_t s_bits[kMaxWords];      // union over T of this row's selection
  __shared__ std::uint32_t s_warp_thr[kMaxWarps];
  __shared__ int s_red[2][kMaxWarps];
  __shared__ int s_count;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int n_warps = blockDim.x >> 5;
  const int n_threads = blockDim.x;
  const int s_begin = static_cast<int>(blockIdx.y) * launch.s_per_block;
  for (int i = tid; i < kMaxWords; i += n_threads) s_bits[i] = 0u;  // each flush zeroes it again

  int li = 0;
  for (int global_row = blockIdx.x; global_row < launch.n_rows; global_row += gridDim.x) {
    li = layer_of(launch, global_row, li);
    const Layer& layer = launch.layers[li];
    const int next_row = global_row + static_cast<int>(gridDim.x);
    if (next_row < launch.n_rows) {
      const Layer& next = launch.layers[layer_of(launch, next_row, li)];
      const std::size_t offset = static_cast<std::size_t>(next_row - next.row_begin) * next.d_in;
      prefetch_row_l2(static_cast<const T*>(next.weight) + offset, next.d_in);
    }
    const int s_end = min(layer.S, s_begin + launch.s_per_block);
    if (s_begin >= s_end) continue;  // uniform over the block: a layer with fewer subsets

    const int row = global_row - layer.row_begin;
    const int d_in = layer.d_in;
    const int k = layer.k;
    const int n_words = (d_in + 31) >> 5;

    LaneRow<E> lr;
    lr.col0 = warp * (32 * E) + lane;
    lr.n_valid = lr.col0 < d_in ? min(E, (d_in - lr.col0 + 31) / 32) : 0;
    lr.padded = (warp + 1) * 32 * E > d_in;
    const T* wrow = static_cast<const T*>(layer.weight) + static_cast<std::size_t>(row) * d_in;
#pragma unroll
    for (int e = 0; e < E; ++e) lr.wabs[e] = e < lr.n_valid ? load_abs(wrow + lr.col0 + e * 32) : 0.f;

    const int n_full = d_in >= 32 ? min(n_warps, (d_in - 32) / (32 * E) + 1) : 0;
    const int c = n_full > 0 ? (k + n_full - 1) / n_full : 33;
    const bool use_filter = c <= 32;
    const int cap = min(kCandCap, 4 * n_threads);  // the rank pass costs n_cand^2 / threads

    for (int s = s_begin; s < s_end; ++s) {
      for (int t = 0; t < layer.T; ++t) {
        const std::size_t v = static_cast<std::size_t>(s) * layer.T + t;
        const float* row_norms = layer.norms + v * d_in;
        const float* row_null_norms = layer.null_norms + v * d_in;
        select_row<T, E>(lr, wrow, row_norms, row_null_norms, k, c, n_full, use_filter, cap, s_cand, s_null,
                         s_bits, s_warp_thr, s_red, &s_count);
        __syncthreads();  // the next vector reuses s_count, s_cand, s_warp_thr, s_red; s_bits is complete
      }

      std::uint32_t* out_row = layer.out + (static_cast<std::size_t>(s) * layer.d_out + row) * n_words;
      for (int i = tid; i < n_words; i += n_threads) {
        const std::uint32_t bits = s_bits[i];
        // A fire-and-forget reduction (RED.OR): no round trip to read `out` before moving on.
        if (bits != 0u) atomicOr(out_row + i, bits);
        s_bits[i] = 0u;  // ordered before the next atomicOr into s_bits by the next vector's barriers
      }
    }
  }
}

using KernelFn = void (*)(Launch);

template <typename T>
KernelFn kernel_for_e(int e) {
  switch (e) {
    case 8: return memorized_mask_kernel<T, 8>;
    case 16: return memorized_mask_kernel<T, 16>;
    case 20: return memorized_mask_kernel<T, 20>;
    case 24: return memorized_mask_kernel<T, 24>;
    case 32: return memorized_mask_kernel<T, 32>;
    default: throw std::logic_error("memorized_mask: no kernel for E = " + std::to_string(e));
  }
}

KernelFn kernel_for(DType dtype, int e) {
  switch (dtype) {
    case DType::kFloat16: return kernel_for_e<__half>(e);
    case DType::kBFloat16: return kernel_for_e<__nv_bfloat16>(e);
    case DType::kFloat32: return kernel_for_e<float>(e);
    default: throw std::invalid_argument("memorized_mask: weight must be float16, bfloat16 or float32");
  }
}

struct Shape {
  int e;        // elements per lane
  int n_warps;  // warps per row
};

// Elements per lane: the least padding (within 1/8 of the least), then a filter that asks each
// warp for at most 16 of its 32 lane maxima (tighter threshold), then the largest E (fewer
// warps, so per-row overheads are shared by more elements).
Shape choose_shape(std::int64_t d_in, std::int64_t k) {
  static constexpr int kEs[] = {32, 24, 20, 16, 8};
  std::int64_t least = -1;
  for (int e : kEs) {
    const std::int64_t warps = ceil_div(d_in, 32 * e);
    if (warps <= kMaxWarps && (least < 0 || warps * 32 * e < least)) least = warps * 32 * e;
  }
  MEMLOC_REQUIRE(least > 0, "memorized_mask: d_in " + std::to_string(d_in) + " exceeds the CUDA backend's limit of " +
                                std::to_string(kMaxCols) + " (use backend='triton' or 'reference')");
  Shape best{0, 0};
  int best_score = -1;
  for (int e : kEs) {
    const std::int64_t warps = ceil_div(d_in, 32 * e);
    if (warps > kMaxWarps || warps * 32 * e * 8 > least * 9) continue;
    const std::int64_t full = d_in >= 32 ? std::min<std::int64_t>(warps, (d_in - 32) / (32 * e) + 1) : 0;
    const bool tight = full > 0 && ceil_div(k, full) <= 16;
    const int score = (tight ? 100 : 0) + e;
    if (score > best_score) {
      best_score = score;
      best = Shape{e, static_cast<int>(warps)};
    }
  }
  return best;
}

// Resident blocks per SM of `kernel` at `threads` per block (cached: a launch-time query).
std::int64_t blocks_per_sm(KernelFn kernel, int threads, int device) {
  static std::mutex mutex;
  static std::map<std::tuple<KernelFn, int, int>, int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(kernel, threads, device);
  auto it = cache.find(key);
  if (it == cache.end()) {
    int per_sm = 0;
    MEMLOC_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
    it = cache.emplace(key, per_sm).first;
  }
  return it->second;
}

}  // namespace

std::int64_t memorized_mask_max_d_in() { return kMaxCols; }

void memorized_mask(const std::vector<MaskLayerArgs>& layers, std::uintptr_t stream, int device,
                    std::uintptr_t stats) {
  if (layers.empty()) return;
  // Under MEMLOC_CUDA_MASK=thread, layers the thread kernel takes (mask_thread.cu: d_in a multiple
  // of 256 up to 8192, k <= 64) go there; other layers the warp kernel takes (mask_warp.cu: d_in a
  // multiple of 8 up to 8192, k <= 96) go there; the rest to this block kernel, grouped so that
  // layers of one dtype and block shape share a launch.
  std::vector<const MaskLayerArgs*> thread_layers, warp_layers;
  std::map<std::tuple<int, int, int>, std::vector<std::pair<const MaskLayerArgs*, Shape>>> groups;
  for (std::size_t i = 0; i < layers.size(); ++i) {
    const MaskLayerArgs& a = layers[i];
    const std::string name = "memorized_mask: layer " + std::to_string(i) + ": ";
    checked_dtype(a.dtype, "memorized_mask weight", /*allow_float64=*/false);
    MEMLOC_REQUIRE(a.weight && a.norms && a.null_norms && a.out, name + "null pointer");
    MEMLOC_REQUIRE(a.d_out > 0 && a.d_in > 0 && a.S > 0 && a.T > 0,
                   name + "d_out, d_in, S and T must be positive");
    MEMLOC_REQUIRE(a.k >= 1 && a.k <= a.d_in, name + "k must be in [1, d_in], got " + std::to_string(a.k));
    MEMLOC_REQUIRE(a.d_out < (1LL << 30) && a.S < (1LL << 30) && a.T < (1LL << 30), name + "sizes too large");
    if (memorized_mask_thread_eligible(a)) {
      thread_layers.push_back(&a);
      continue;
    }
    if (memorized_mask_warp_eligible(a)) {
      warp_layers.push_back(&a);
      continue;
    }
    const Shape shape = choose_shape(a.d_in, a.k);
    groups[{a.dtype, shape.e, shape.n_warps}].push_back({&a, shape});
  }
  memorized_mask_thread(thread_layers, stream, device, stats);
  memorized_mask_warp(warp_layers, stream, device, stats);

  DeviceGuard guard(device);
  const int sms = sm_count(device);
  for (const auto& [key, members] : groups) {
    const DType dtype = static_cast<DType>(std::get<0>(key));
    const int e = std::get<1>(key);
    const int n_warps = std::get<2>(key);
    const KernelFn kernel = kernel_for(dtype, e);
    for (std::size_t first = 0; first < members.size(); first += kMaxLayers) {
      const std::size_t last = std::min(members.size(), first + kMaxLayers);
      Launch launch{};
      std::int64_t rows = 0, max_s = 0;
      for (std::size_t i = first; i < last; ++i) {
        const MaskLayerArgs& a = *members[i].first;
        Layer& l = launch.layers[i - first];
        fill_mask_layer(l, a);
        l.S = static_cast<int>(a.S);
        l.row_begin = static_cast<int>(rows);
        rows += a.d_out;
        max_s = std::max<std::int64_t>(max_s, a.S);
      }
      MEMLOC_REQUIRE(rows < (1LL << 31), "memorized_mask: too many rows in one launch");
      launch.n_layers = static_cast<int>(last - first);
      launch.n_rows = static_cast<int>(rows);
      // Split the subsets over blockIdx.y only when the rows alone leave SMs idle (small layers,
      // large S); each such block re-reads its rows of W from L2.
      const std::int64_t chunks =
          std::clamp<std::int64_t>(ceil_div(4LL * sms, rows), 1, std::min<std::int64_t>(max_s, 65535));
      launch.s_per_block = static_cast<int>(ceil_div(max_s, chunks));
      const std::int64_t grid_y = ceil_div(max_s, launch.s_per_block);
      // Persistent blocks: as many as fit on the GPU at once (at least one row each).
      const std::int64_t resident = std::max<std::int64_t>(1, blocks_per_sm(kernel, n_warps * 32, device) * sms);
      const std::int64_t grid_x = std::min<std::int64_t>(rows, ceil_div(resident, grid_y));
      const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
      kernel<<<grid, n_warps * 32, 0, as_stream(stream)>>>(launch);
      MEMLOC_CUDA_CHECK_LAUNCH();
    }
  }
}

}  // namespace memloc::cuda
