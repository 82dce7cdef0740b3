// memorized_mask, warp kernel: one warp per (weight row, norm vector); the row's 8-column block
// maxima stay in registers, so the selection never touches global scratch.
//
// Lane l owns, in chunk i, the 8-column block b = 32 i + l (columns 8b .. 8b + 7: one 16-byte load
// of f16/bf16 weights, two of norms). Per (row, vector):
//  1. pass 1: scores |W| * norm (the reference's float32 bits), the maximum of every block into
//     bm[i] (NC registers per lane);
//  2. bound: a bisection on the block maxima's bits (REDUX counts) until lo has k to kCap blocks
//     with maximum >= lo. Every top-k score lies in such a block (its maximum is >= the score >=
//     the k-th largest score >= the k-th largest block maximum >= lo);
//  3. those blocks are listed (a warp scan of per-lane counts) and gathered, at most 4 per lane
//     (32 scores in registers), recomputed with the same operations (bit-identical);
//  4. lo is raised to the k-th largest listed block maximum (bisection on 4 values per lane),
//     then the smallest scores >= lo are dropped one distinct value at a time while more than k
//     remain: that ends at exactly k scores >= lo, or at a tie straddling the k-th place;
//  5. the null comparison on the k selected, one fire-and-forget atomicOr per block (a block lies
//     inside one mask word; OR is order-free, so the union over timesteps is free).
// A problem the fast path cannot decide (more than kCap blocks share the values around the k-th
// place, fewer than k non-negative block maxima, or equal scores straddling the k-th place) runs
// an exact bisection over the whole row in the same warp (32 passes, ties to the lower column by a
// column-ordered scan) and is counted in `stats` when given.
//
// Non-negative floats (and NaN, above +inf, as in torch.topk) order like their int32 bits, so all
// comparisons are on int32; padding is -1. Batched launches (several vectors per warp) first copy
// each warp's weight row to shared memory (kStage), so that W is read from HBM once per item.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"
#include "mask_warp.h"

namespace memloc::cuda {
namespace {

constexpr int kWarps = 8;            // warps (rows) per block at most: they share each norm row in L1
constexpr int kDefaultWarps = 4;     // H100, SD1.5: 79.1 us with 4, 81.5 with 8 (BENCHMARKS.md)
constexpr int kCap = 128;            // listed blocks at most (kSlots per lane)
constexpr int kSlots = kCap / 32;
constexpr int kMaxLayers = 48;
constexpr int kMaxStageBytes = 96 * 1024;
constexpr int kIntMax = 0x7fffffff;
// Whether eligible layers take this kernel when MEMLOC_CUDA_MASK is unset ("warp": yes, "block": no).
constexpr bool kWarpByDefault = true;

struct WLayer {
  const void* weight;
  const float* norms;
  const float* null_norms;
  std::uint32_t* out;
  int d_out, d_in, k, T;
  int n_vec;       // S * T norm vectors
  int span;        // vectors per work item
  int n_spans;     // work items per group of `warps` rows
  int item_begin;  // first work item (block) of this layer in the launch
};

struct WLaunch {
  WLayer layers[kMaxLayers];
  int n_layers;
  int warps;  // rows per block (blockDim.x / 32), at most kWarps
  int* stats;  // problems that took the exact path (may be null)
};
static_assert(sizeof(WLaunch) <= 4000, "the layer table must fit the kernel parameter space");

// 8 consecutive weights as raw 16-byte words: one for f16/bf16, two for f32.
template <typename T>
struct Raw8 {
  uint4 q[sizeof(T) / 2];
};

template <typename T>
__device__ __forceinline__ std::uint32_t word_of(const Raw8<T>& r, int i) {
  const uint4& q = r.q[i / 4];
  switch (i % 4) {
    case 0: return q.x;
    case 1: return q.y;
    case 2: return q.z;
    default: return q.w;
  }
}

template <typename T>
__device__ __forceinline__ float abs_elem(const Raw8<T>& r, int j);
template <>
__device__ __forceinline__ float abs_elem<__half>(const Raw8<__half>& r, int j) {
  const std::uint32_t w = word_of(r, j / 2);
  const unsigned short h = static_cast<unsigned short>((j & 1) ? (w >> 16) : (w & 0xffffu));
  return fabsf(__half2float(__ushort_as_half(h)));
}
template <>
__device__ __forceinline__ float abs_elem<__nv_bfloat16>(const Raw8<__nv_bfloat16>& r, int j) {
  const std::uint32_t w = word_of(r, j / 2);
  return fabsf(__uint_as_float((j & 1) ? (w & 0xffff0000u) : (w << 16)));
}
template <>
__device__ __forceinline__ float abs_elem<float>(const Raw8<float>& r, int j) {
  return fabsf(__uint_as_float(word_of(r, j)));
}

struct Norm8 {
  float4 a, b;
  __device__ __forceinline__ float operator[](int j) const {
    const float4& h = j < 4 ? a : b;
    switch (j % 4) {
      case 0: return h.x;
      case 1: return h.y;
      case 2: return h.z;
      default: return h.w;
    }
  }
};

__device__ __forceinline__ Norm8 load_norm8(const float* row, int block) {
  const float4* p = reinterpret_cast<const float4*>(row) + 2 * block;
  return Norm8{__ldg(p), __ldg(p + 1)};
}

// One warp's view of its weight row: global memory, or the copy in shared memory (kStage).
template <typename T, bool kStage>
struct RowSource {
  const uint4* global;  // the row as 16-byte words
  const uint4* shared;  // kStage: this warp's copy
  __device__ __forceinline__ Raw8<T> load(int block) const {
    constexpr int kQ = sizeof(T) / 2;
    Raw8<T> r;
#pragma unroll
    for (int q = 0; q < kQ; ++q) r.q[q] = kStage ? shared[block * kQ + q] : __ldg(global + block * kQ + q);
    return r;
  }
};

// Score bits of the 8 columns of a block (the reference's float32 product).
template <typename T>
__device__ __forceinline__ void block_scores(const Raw8<T>& w, const Norm8& n, int (&s)[8]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) s[j] = __float_as_int(__fmul_rn(abs_elem<T>(w, j), n[j]));
}

__device__ __forceinline__ int warp_count(int local) { return static_cast<int>(__reduce_add_sync(kFullMask, local)); }

// Exact top-k + null test + OR for one (row, vector), streaming the row once per bisection step.
// Orders scores by their int32 bits with the sign flipped to unsigned order (so that any bits,
// even of -0.0, have a place); equal scores at the k-th place go to the lower column.
template <typename T, bool kStage>
__device__ void exact_row(const RowSource<T, kStage>& src, const float* nrow, const float* zrow, std::uint32_t* out_row,
                          int n_blocks, int k, int lane) {
  auto key = [](int s) { return static_cast<std::uint32_t>(s) ^ 0x80000000u; };
  std::uint32_t tau = 0u;  // the largest t with count(key >= t) >= k: the k-th largest key
  for (int bit = 31; bit >= 0; --bit) {
    const std::uint32_t probe = tau | (1u << bit);
    int c = 0;
    for (int b = lane; b < n_blocks; b += 32) {
      int s[8];
      block_scores<T>(src.load(b), load_norm8(nrow, b), s);
#pragma unroll
      for (int j = 0; j < 8; ++j) c += key(s[j]) >= probe ? 1 : 0;
    }
    if (warp_count(c) >= k) tau = probe;
  }
  int gt = 0;
  for (int b = lane; b < n_blocks; b += 32) {
    int s[8];
    block_scores<T>(src.load(b), load_norm8(nrow, b), s);
#pragma unroll
    for (int j = 0; j < 8; ++j) gt += key(s[j]) > tau ? 1 : 0;
  }
  const int need = k - warp_count(gt);  // equal scores taken, lowest column first
  int seen = 0;                         // equal scores in earlier chunks
  for (int b0 = 0; b0 < n_blocks; b0 += 32) {
    const int b = b0 + lane;
    const bool real = b < n_blocks;
    const int bc = real ? b : 0;
    const Raw8<T> w = src.load(bc);
    int s[8];
    block_scores<T>(w, load_norm8(nrow, bc), s);
    unsigned eq = 0u;
#pragma unroll
    for (int j = 0; j < 8; ++j) eq |= (real && key(s[j]) == tau) ? (1u << j) : 0u;
    const int mine = __popc(eq);
    int incl = mine;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int t = __shfl_up_sync(kFullMask, incl, d);
      if (lane >= d) incl += t;
    }
    const int before = seen + incl - mine;
    seen += __shfl_sync(kFullMask, incl, 31);
    if (!real) continue;
    const Norm8 z = load_norm8(zrow, b);
    std::uint32_t bits = 0u;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int rank = before + __popc(eq & ((1u << j) - 1u));
      const bool top = key(s[j]) > tau || (((eq >> j) & 1u) && rank < need);
      if (top && __int_as_float(s[j]) > __fmul_rn(abs_elem<T>(w, j), z[j])) bits |= 1u << j;
    }
    if (bits) atomicOr(out_row + (b >> 2), bits << ((b & 3) * 8));
  }
}

template <typename T, int NC, bool kStage>
__global__ void __launch_bounds__(kWarps * 32, 2) mask_warp_kernel(const __grid_constant__ WLaunch launch) {
  extern __shared__ uint4 s_rows[];  // kStage: each warp's weight row
  __shared__ int s_list[kWarps][kCap];
  constexpr int kQ = sizeof(T) / 2;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int item_id = static_cast<int>(blockIdx.x);
  int li = 0;
  while (li + 1 < launch.n_layers && item_id >= launch.layers[li + 1].item_begin) ++li;
  const WLayer& ly = launch.layers[li];
  const int item = item_id - ly.item_begin;
  const int row = (item / ly.n_spans) * launch.warps + warp;
  if (row >= ly.d_out) return;  // no block-wide barrier below: each warp works alone
  const int d_in = ly.d_in;
  const int k = ly.k;
  const int n_blocks = d_in >> 3;
  const int n_words = (d_in + 31) >> 5;
  const int v_begin = (item % ly.n_spans) * ly.span;
  const int v_end = min(v_begin + ly.span, ly.n_vec);

  RowSource<T, kStage> src;
  src.global = reinterpret_cast<const uint4*>(static_cast<const T*>(ly.weight) + static_cast<std::size_t>(row) * d_in);
  src.shared = s_rows + static_cast<std::size_t>(warp) * NC * 32 * kQ;
  if (kStage) {
    uint4* mine = s_rows + static_cast<std::size_t>(warp) * NC * 32 * kQ;
    for (int i = lane; i < n_blocks * kQ; i += 32) mine[i] = __ldg(src.global + i);
    __syncwarp();
  }
  int* list = s_list[warp];

  for (int v = v_begin; v < v_end; ++v) {
    const float* nrow = ly.norms + static_cast<std::size_t>(v) * d_in;
    const float* zrow = ly.null_norms + static_cast<std::size_t>(v) * d_in;
    std::uint32_t* out_row = ly.out + (static_cast<std::size_t>(v / ly.T) * ly.d_out + row) * n_words;

    // 1. block maxima (loads clamped to a real block, so the pass is branch-free)
    int bm[NC];
#pragma unroll
    for (int i = 0; i < NC; ++i) {
      const int b = i * 32 + lane;
      const int bc = min(b, n_blocks - 1);
      int s[8];
      block_scores<T>(src.load(bc), load_norm8(nrow, bc), s);
      int m = s[0];
#pragma unroll
      for (int j = 1; j < 8; ++j) m = max(m, s[j]);
      bm[i] = b < n_blocks ? m : -1;
    }
    auto count_bm = [&](int t) {
      int c = 0;
#pragma unroll
      for (int i = 0; i < NC; ++i) c += bm[i] >= t ? 1 : 0;
      return warp_count(c);
    };

    // 2. a bound lo reached by k to kCap block maxima (start 8 octaves below the top)
    int lmax = bm[0];
#pragma unroll
    for (int i = 1; i < NC; ++i) lmax = max(lmax, bm[i]);
    const int top = __reduce_max_sync(kFullMask, lmax);
    int lo = max(top - (8 << 23), 0);
    long long hi = static_cast<long long>(top) + 1;  // count(>= hi) == 0 < k (NaN bits are INT_MAX)
    int c_lo = count_bm(lo);
    if (c_lo < k) {
      hi = max(lo, 1);
      lo = 0;
      c_lo = count_bm(0);
    }
    bool fast = c_lo >= k;
    while (fast && c_lo > kCap && hi - lo > 1) {
      const int mid = static_cast<int>(lo + (hi - lo) / 2);
      const int c = count_bm(mid);
      if (c >= k) {
        lo = mid;
        c_lo = c;
      } else {
        hi = mid;
      }
    }
    fast = fast && c_lo <= kCap;

    if (fast) {
      // 3. list the blocks reaching lo (lane-major), gather their scores
      unsigned hits = 0u;
#pragma unroll
      for (int i = 0; i < NC; ++i) hits |= (bm[i] >= lo ? 1u : 0u) << i;
      const int mine = __popc(hits);
      int incl = mine;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int t = __shfl_up_sync(kFullMask, incl, d);
        if (lane >= d) incl += t;
      }
      int pos = incl - mine;
      while (hits) {
        const int i = __ffs(hits) - 1;
        hits &= hits - 1u;
        list[pos++] = i * 32 + lane;
      }
      __syncwarp();
      const int n_listed = c_lo;
      int blk[kSlots];
      int sc[kSlots][8];
      int bmx[kSlots];
#pragma unroll
      for (int q = 0; q < kSlots; ++q) {
        const int slot = q * 32 + lane;
        blk[q] = -1;
        bmx[q] = -1;
#pragma unroll
        for (int j = 0; j < 8; ++j) sc[q][j] = -1;
        if (q * 32 < n_listed) {  // warp-uniform: skip slot groups nobody holds
          blk[q] = slot < n_listed ? list[slot] : -1;
          const int bc = max(blk[q], 0);
          int s[8];
          block_scores<T>(src.load(bc), load_norm8(nrow, bc), s);
          int m = -1;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            sc[q][j] = blk[q] >= 0 ? s[j] : -1;
            m = max(m, sc[q][j]);
          }
          bmx[q] = m;
        }
      }
      __syncwarp();  // the list is read before the next vector rewrites it

      // 4a. lo = the k-th largest listed block maximum
      auto count_bmx = [&](int t) {
        int c = 0;
#pragma unroll
        for (int q = 0; q < kSlots; ++q) c += bmx[q] >= t ? 1 : 0;
        return warp_count(c);
      };
      while (c_lo > k && hi - lo > 1) {
        const int mid = static_cast<int>(lo + (hi - lo) / 2);
        const int c = count_bmx(mid);
        if (c >= k) {
          lo = mid;
          c_lo = c;
        } else {
          hi = mid;
        }
      }
      if (c_lo == k) {  // exactly k blocks reach lo: raise it to the least of their maxima
        int m = kIntMax;
#pragma unroll
        for (int q = 0; q < kSlots; ++q) m = min(m, bmx[q] >= lo ? bmx[q] : kIntMax);
        lo = __reduce_min_sync(kFullMask, m);
      }
      // 4b. drop the smallest scores >= lo while more than k remain
      auto count_sc = [&](int t) {
        int c = 0;
#pragma unroll
        for (int q = 0; q < kSlots; ++q)
#pragma unroll
          for (int j = 0; j < 8; ++j) c += sc[q][j] >= t ? 1 : 0;
        return warp_count(c);
      };
      int c_s = count_sc(lo);
      bool tie = false;
      while (c_s > k) {
        int m = kIntMax;
#pragma unroll
        for (int q = 0; q < kSlots; ++q)
#pragma unroll
          for (int j = 0; j < 8; ++j) m = min(m, sc[q][j] >= lo ? sc[q][j] : kIntMax);
        const int low = __reduce_min_sync(kFullMask, m);
        int n_low = 0;
#pragma unroll
        for (int q = 0; q < kSlots; ++q)
#pragma unroll
          for (int j = 0; j < 8; ++j) n_low += sc[q][j] == low ? 1 : 0;
        n_low = warp_count(n_low);
        if (c_s - n_low >= k) {
          lo = low + 1;
          c_s -= n_low;
        } else {
          tie = true;  // equal scores straddle the k-th place: the exact path orders them by column
          break;
        }
      }
      if (!tie) {
        // 5. the k scores >= lo: null comparison, then one OR per block
#pragma unroll
        for (int q = 0; q < kSlots; ++q) {
          if (q * 32 < n_listed && blk[q] >= 0) {
            const int b = blk[q];
            std::uint32_t bits = 0u;
#pragma unroll
            for (int j = 0; j < 8; ++j) bits |= sc[q][j] >= lo ? (1u << j) : 0u;
            if (bits) {
              const Raw8<T> w = src.load(b);
              const Norm8 z = load_norm8(zrow, b);
#pragma unroll
              for (int j = 0; j < 8; ++j) {
                if (!(__int_as_float(sc[q][j]) > __fmul_rn(abs_elem<T>(w, j), z[j]))) bits &= ~(1u << j);
              }
              if (bits) atomicOr(out_row + (b >> 2), bits << ((b & 3) * 8));
            }
          }
        }
        continue;
      }
    }
    if (lane == 0 && launch.stats) atomicAdd(launch.stats, 1);
    exact_row<T, kStage>(src, nrow, zrow, out_row, n_blocks, k, lane);
  }
}

using KernelFn = void (*)(WLaunch);

template <typename T, bool kStage>
KernelFn kernel_for_nc(int nc) {
  switch (nc) {
    case 5: return mask_warp_kernel<T, 5, kStage>;
    case 10: return mask_warp_kernel<T, 10, kStage>;
    case 20: return mask_warp_kernel<T, 20, kStage>;
    case 32: return mask_warp_kernel<T, 32, kStage>;
    default: throw std::logic_error("memorized_mask (warp): no kernel for " + std::to_string(nc) + " chunks");
  }
}

template <typename T>
KernelFn kernel_for_stage(int nc, bool stage) {
  return stage ? kernel_for_nc<T, true>(nc) : kernel_for_nc<T, false>(nc);
}

KernelFn kernel_for(DType dtype, int nc, bool stage) {
  switch (dtype) {
    case DType::kFloat16: return kernel_for_stage<__half>(nc, stage);
    case DType::kBFloat16: return kernel_for_stage<__nv_bfloat16>(nc, stage);
    case DType::kFloat32: return kernel_for_stage<float>(nc, stage);
    default: throw std::invalid_argument("memorized_mask: weight must be float16, bfloat16 or float32");
  }
}

int element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// Chunks of 256 columns per row, rounded up to a compiled size.
int chunks_for(std::int64_t d_in) {
  const std::int64_t need = ceil_div(d_in, 256);
  for (int nc : {5, 10, 20, 32})
    if (need <= nc) return nc;
  return 0;
}

int stage_bytes(DType dtype, int nc, int warps) { return warps * nc * 256 * element_size(dtype); }

// Rows per block: kDefaultWarps, or MEMLOC_CUDA_MASK_WARPS (1..8, a tuning knob read per call).
int block_warps() {
  const char* env = std::getenv("MEMLOC_CUDA_MASK_WARPS");
  const int w = env != nullptr ? std::atoi(env) : kDefaultWarps;
  return std::clamp(w, 1, kWarps);
}

// Resident blocks per SM (cached); raises the dynamic shared memory limit once per kernel.
int blocks_per_sm(KernelFn kernel, int warps, int smem, int device) {
  static std::mutex mutex;
  static std::map<std::tuple<KernelFn, int, int, int>, int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(kernel, warps, smem, device);
  auto it = cache.find(key);
  if (it == cache.end()) {
    if (smem > 48 * 1024)
      MEMLOC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int per_sm = 0;
    MEMLOC_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, warps * 32, smem));
    it = cache.emplace(key, std::max(per_sm, 1)).first;
  }
  return it->second;
}

bool aligned16(std::uintptr_t p) { return p % 16 == 0; }

}  // namespace

bool memorized_mask_warp_eligible(const MaskLayerArgs& a) {
  const char* env = std::getenv("MEMLOC_CUDA_MASK");  // read per call: tests and benchmarks switch it
  const bool use = env == nullptr || env[0] == '\0' ? kWarpByDefault : std::strcmp(env, "block") != 0;
  return use && a.d_in % 8 == 0 && chunks_for(a.d_in) > 0 && a.k <= kCap - 32 && a.k <= a.d_in / 8 &&
         a.dtype >= 0 && a.dtype <= static_cast<int>(DType::kFloat32) && aligned16(a.weight) && aligned16(a.norms) &&
         aligned16(a.null_norms) && a.S * a.T < (1LL << 31);
}

void memorized_mask_warp(const std::vector<const MaskLayerArgs*>& layers, std::uintptr_t stream, int device,
                         std::uintptr_t stats) {
  if (layers.empty()) return;
  DeviceGuard guard(device);
  const int sms = sm_count(device);
  const int warps = block_warps();
  // One launch per (dtype, chunks, staging); the widest rows first.
  std::map<std::tuple<int, int, int>, std::vector<const MaskLayerArgs*>, std::greater<>> groups;
  for (const MaskLayerArgs* a : layers) {
    const int nc = chunks_for(a->d_in);
    const bool stage = a->S * a->T > 1 && stage_bytes(static_cast<DType>(a->dtype), nc, warps) <= kMaxStageBytes;
    groups[{nc, a->dtype, stage ? 1 : 0}].push_back(a);
  }
  for (const auto& [key, members] : groups) {
    const int nc = std::get<0>(key);
    const DType dtype = static_cast<DType>(std::get<1>(key));
    const bool stage = std::get<2>(key) != 0;
    const int smem = stage ? stage_bytes(dtype, nc, warps) : 0;
    const KernelFn kernel = kernel_for(dtype, nc, stage);
    const std::int64_t resident = static_cast<std::int64_t>(blocks_per_sm(kernel, warps, smem, device)) * sms;
    for (std::size_t first = 0; first < members.size(); first += kMaxLayers) {
      const std::size_t last = std::min(members.size(), first + kMaxLayers);
      std::int64_t groups_of_rows = 0, max_vec = 1;
      for (std::size_t i = first; i < last; ++i) {
        groups_of_rows += ceil_div(members[i]->d_out, warps);
        max_vec = std::max<std::int64_t>(max_vec, members[i]->S * members[i]->T);
      }
      // split the vectors until there are about 4 waves of blocks
      const std::int64_t pieces = std::clamp<std::int64_t>(ceil_div(4 * resident, groups_of_rows), 1, max_vec);
      WLaunch launch{};
      launch.n_layers = static_cast<int>(last - first);
      launch.warps = warps;
      launch.stats = reinterpret_cast<int*>(stats);
      std::int64_t items = 0;
      for (std::size_t i = first; i < last; ++i) {
        const MaskLayerArgs& a = *members[i];
        WLayer& l = launch.layers[i - first];
        fill_mask_layer(l, a);
        l.n_vec = static_cast<int>(a.S * a.T);
        l.span = static_cast<int>(ceil_div(l.n_vec, std::min<std::int64_t>(pieces, l.n_vec)));
        l.n_spans = static_cast<int>(ceil_div(l.n_vec, l.span));
        l.item_begin = static_cast<int>(items);
        items += ceil_div(a.d_out, warps) * l.n_spans;
      }
      MEMLOC_REQUIRE(items < (1LL << 31), "memorized_mask: too many work items in one launch");
      kernel<<<static_cast<unsigned>(items), warps * 32, smem, as_stream(stream)>>>(launch);
      MEMLOC_CUDA_CHECK_LAUNCH();
    }
  }
}

}  // namespace memloc::cuda
