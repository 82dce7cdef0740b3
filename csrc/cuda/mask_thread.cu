// memorized_mask, thread kernel (batched calls): one thread per (weight row, norm vector).
//
// A block holds 32 weight rows (lane l: row row0 + l) and 4 warps; in each round warp w takes one
// norm vector, so the block solves 128 problems at once. The rows stream through shared memory in
// tiles of 512 bytes per row (256 f16/bf16 or 128 f32 columns), loaded once per round for the four
// warps while the previous tile is being scored (register prefetch). Per thread and problem:
//  1. the pass: the scores |W| * norm of each 8-column block (the reference's float32 bits, as the
//     warp kernel) and their maximum; a block whose maximum reaches the thread's threshold g is
//     appended to its candidate list in shared memory (maximum and block index, 96 slots). g starts
//     a little below the k-th largest block maximum of the thread's previous problem (warm start;
//     the row's previous vector), or at 0. When the list nears full, g is raised to a value that k
//     to 72 listed maxima reach and the list is compacted: the row's k-th largest block maximum is
//     at least the k-th largest of any subset, so no block that holds a top-k score is dropped;
//  2. beta = the k-th largest listed maximum (the row's k-th largest block maximum, as every block
//     reaching it is listed): a bisection on the listed values; every top-k score lies in a block
//     whose maximum is >= beta;
//  3. those blocks are rescored (from global memory, L2) and the list becomes their scores >= beta
//     with columns (the maxima in place, the rare other scores >= beta appended);
//  4. the smallest values are dropped one distinct value at a time while more than k remain, then
//     the null comparison on the k left and one atomicOr per column (OR is order-free).
// A problem this path cannot decide (fewer than k blocks reach g, equal scores straddling the k-th
// place, or more ties than the list holds) writes nothing here and is solved after the round by its
// whole warp with the warp kernel's per-problem code (solve_problem, which has the exact path), and
// is counted in `stats`; a miss also doubles the thread's warm-start margin.
//
// Shared memory (f16): 16.5 KB of W tile, 4 KB of norm tiles, 72 KB of candidate lists, 4 KB for
// the warp fallback: two blocks (8 warps) per SM; registers are not the limit (up to 255).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <tuple>

#include "common.cuh"
#include "mask_thread.h"
#include "mask_warp.cuh"

namespace memloc::cuda {
namespace {

constexpr int kTW = 4;                    // warps per block: norm vectors per round
constexpr int kThreads = kTW * 32;
constexpr int kTileBytes = 512;           // W bytes per row and tile
constexpr int kRowStride = kTileBytes / 16 + 1;  // 16-byte words per tile row (one of padding: lane l's
                                                 // row starts 16 l bytes into a bank cycle)
constexpr int kListLen = 96;                // candidate list length per thread
constexpr int kGroup = 8;                 // blocks scored between two checks of the list's room
constexpr int kRaiseTo = kListLen - 3 * kGroup;  // a raise leaves at most this many (k <= kMaxK)
constexpr int kMaxK = 64;
constexpr int kBatch = 4;                // global loads in flight per thread after the pass
constexpr int kMaxLayersT = 48;
// Warm start: g starts this many float32 bits below the previous beta (half an octave; a quarter
// for k >= 32, whose k-th order statistics move less), doubled after each miss, up to 4 octaves
// (benchmarks/model_mask_thread.py: the fewest list scans for few misses on the benchmark data).
constexpr int kDrop0 = 1 << 22;
constexpr int kDropWideK = 1 << 21;
constexpr int kDropMax = 1 << 25;
static_assert(kRaiseTo >= kMaxK + 8, "a raise must leave room above k");

struct TLaunch {
  VecLayer layers[kMaxLayersT];  // span: a multiple of kTW
  int n_layers;
  int* stats;  // problems left to the warp path (may be null)
};
static_assert(sizeof(TLaunch) <= 4000, "the layer table must fit the kernel parameter space");

// One thread's candidate list: slot i of thread tid at [i * kThreads + tid] (conflict-free).
struct Cands {
  int* val;               // block maxima, later scores
  unsigned short* ix;     // block indices, later columns
  __device__ __forceinline__ int v(int i) const { return val[i * kThreads]; }
  __device__ __forceinline__ int count_ge(int n, int t) const {
    int c = 0;
#pragma unroll 4
    for (int i = 0; i < n; ++i) c += v(i) >= t ? 1 : 0;
    return c;
  }
  __device__ __forceinline__ int max_of(int n) const {
    int m = -1;
#pragma unroll 4
    for (int i = 0; i < n; ++i) m = max(m, v(i));
    return m;
  }
  // keeps the entries >= t, in order; returns how many
  __device__ __forceinline__ int keep_ge(int n, int t) const {
    int j = 0;
    for (int i = 0; i < n; ++i) {
      const int x = v(i);
      if (x >= t) {
        val[j * kThreads] = x;
        ix[j * kThreads] = ix[i * kThreads];
        ++j;
      }
    }
    return j;
  }
};

// The list is nearly full (n > kListLen - kGroup >= k, every entry >= g): raise g so that k to
// kRaiseTo entries reach it and keep those. False when ties leave no room (the problem fails).
__device__ __forceinline__ bool raise_bound(const Cands& c, int& n, int& g, int k) {
  long long hi = static_cast<long long>(c.max_of(n)) + 1;
  int lo = g, c_lo = n;
  const int deep = static_cast<int>(max(hi - 1 - (8LL << 23), 0LL));  // 8 octaves below the top
  if (deep > lo) {
    const int cd = c.count_ge(n, deep);
    if (cd >= k) {
      lo = deep;
      c_lo = cd;
    } else {
      hi = deep;
    }
  }
  shrink([&](int t) { return c.count_ge(n, t); }, lo, hi, c_lo, k, kRaiseTo);
  if (c_lo > kListLen - 2 * kGroup) return false;
  n = c.keep_ge(n, lo);
  g = lo;
  return true;
}

// Tile t into registers: this thread's W words, and (warp_on) its lane's share of the warp's norm tile.
template <int kWLoads, int kNLoads, int kCols>
__device__ __forceinline__ void fetch_tile(const uint4* const (&w_src)[kWLoads], int t, bool warp_on, const float* nrow,
                                           int lane, uint4 (&wr)[kWLoads], float4 (&nr)[kNLoads]) {
#pragma unroll
  for (int i = 0; i < kWLoads; ++i) wr[i] = __ldg(w_src[i] + t * (kTileBytes / 16));
  if (warp_on) {
#pragma unroll
    for (int i = 0; i < kNLoads; ++i) nr[i] = __ldg(reinterpret_cast<const float4*>(nrow + t * kCols) + lane + 32 * i);
  }
}

template <typename T, int NC>
__global__ void __launch_bounds__(kThreads, 2) mask_thread_kernel(const __grid_constant__ TLaunch launch) {
  constexpr int kCols = kTileBytes / static_cast<int>(sizeof(T));  // columns per tile
  constexpr int kTB = kCols / 8;                                     // blocks per tile
  constexpr int kWLoads = 32 * (kTileBytes / 16) / kThreads;         // W words per thread and tile
  constexpr int kNLoads = kCols / 4 / 32;                            // norm float4 per lane and tile
  extern __shared__ uint4 smem[];
  uint4* s_w = smem;                                                      // [32][kRowStride]
  float* s_n = reinterpret_cast<float*>(s_w + 32 * kRowStride);           // [kTW][kCols]
  int* s_val = reinterpret_cast<int*>(s_n + kTW * kCols);                 // [kListLen][kThreads]
  unsigned short* s_ix = reinterpret_cast<unsigned short*>(s_val + kListLen * kThreads);  // [kListLen][kThreads]
  int* s_list = reinterpret_cast<int*>(s_ix + kListLen * kThreads);         // [kTW][kCap]: warp fallback
  int* s_scores = s_list + kTW * kCap;                                    // [kTW][kCap]

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int item_id = static_cast<int>(blockIdx.x);
  int li = 0;
  while (li + 1 < launch.n_layers && item_id >= launch.layers[li + 1].item_begin) ++li;
  const VecLayer& ly = launch.layers[li];
  const int item = item_id - ly.item_begin;
  const int row0 = (item / ly.n_spans) * 32;
  const int row = row0 + lane;
  const bool row_ok = row < ly.d_out;
  const int d_in = ly.d_in;
  const int k = ly.k;
  const int n_blocks = d_in >> 3;
  const int n_tiles = d_in / kCols;
  const int n_words = (d_in + 31) >> 5;
  const int v_begin = (item % ly.n_spans) * ly.span;
  const int v_end = min(v_begin + ly.span, ly.n_vec);
  const T* weight = static_cast<const T*>(ly.weight);
  const Cands cands{s_val + tid, s_ix + tid};
  // tile loads: W word q = tid + kThreads * i is word (q % 32) of tile row q / 32
  const uint4* w_src[kWLoads];
#pragma unroll
  for (int i = 0; i < kWLoads; ++i) {
    const int q = tid + kThreads * i;
    const int r = min(row0 + q / 32, ly.d_out - 1);
    w_src[i] = reinterpret_cast<const uint4*>(weight + static_cast<std::size_t>(r) * d_in) + (q % 32);
  }
  int guess = -1;  // beta of this thread's previous problem
  int drop = ly.k >= 32 ? kDropWideK : kDrop0;

  for (int v0 = v_begin; v0 < v_end; v0 += kTW) {
    const int v = v0 + warp;
    const bool warp_on = v < v_end;  // warp-uniform
    const bool on = warp_on && row_ok;
    const float* nrow = ly.norms + static_cast<std::size_t>(warp_on ? v : v_begin) * d_in;
    int g = guess >= 0 ? max(guess - drop, 0) : 0;
    int n = 0;
    bool failed = false;
    uint4 wr[kWLoads];
    float4 nr[kNLoads];
    fetch_tile<kWLoads, kNLoads, kCols>(w_src, 0, warp_on, nrow, lane, wr, nr);
    for (int t = 0; t < n_tiles; ++t) {
      __syncthreads();  // every warp is done with the previous tile
#pragma unroll
      for (int i = 0; i < kWLoads; ++i) {
        const int q = tid + kThreads * i;
        s_w[(q / 32) * kRowStride + q % 32] = wr[i];
      }
      if (warp_on) {
#pragma unroll
        for (int i = 0; i < kNLoads; ++i) reinterpret_cast<float4*>(s_n + warp * kCols)[lane + 32 * i] = nr[i];
      }
      __syncthreads();
      if (t + 1 < n_tiles) fetch_tile<kWLoads, kNLoads, kCols>(w_src, t + 1, warp_on, nrow, lane, wr, nr);  // in flight
      if (on) {
        RowSource<T, true> tile;  // this thread's row of the tile
        tile.global = nullptr;
        tile.shared = s_w + lane * kRowStride;
        const float4* nt = reinterpret_cast<const float4*>(s_n + warp * kCols);
#pragma unroll 1
        for (int b0 = 0; b0 < kTB; b0 += kGroup) {
          if (n > kListLen - kGroup) {
            if (failed) {
              n = 0;
            } else if (!raise_bound(cands, n, g, k)) {
              failed = true;
              n = 0;
            }
          }
          // all loads of the group first (registers are not the limit), then the scores
          Raw8<T> w[kGroup];
          Norm8 nn[kGroup];
#pragma unroll
          for (int j = 0; j < kGroup; ++j) {
            w[j] = tile.load(b0 + j);
            nn[j] = Norm8{nt[2 * (b0 + j)], nt[2 * (b0 + j) + 1]};
          }
          int* pv = s_val + n * kThreads + tid;
          unsigned short* pi = s_ix + n * kThreads + tid;
          const int tb = t * kTB + b0;
#pragma unroll
          for (int j = 0; j < kGroup; ++j) {
            int s[8];
            block_scores<T>(w[j], nn[j], s);
            int m = s[0];
#pragma unroll
            for (int e = 1; e < 8; ++e) m = max(m, s[e]);
            if (m >= g) {
              *pv = m;
              *pi = static_cast<unsigned short>(tb + j);
              pv += kThreads;
              pi += kThreads;
            }
          }
          n = static_cast<int>(pi - (s_ix + tid)) / kThreads;
        }
      }
    }

    // 2-4 per thread, on the list
    if (on && !failed) {
      if (n < k) {  // g was above the k-th largest block maximum: a miss
        failed = true;
        drop = min(drop * 2, kDropMax);
      }
    }
    if (on && !failed) {
      // 2. beta: the k-th largest listed maximum
      int lo = g, c_lo = n;
      long long hi = static_cast<long long>(cands.max_of(n)) + 1;
      if (guess > lo && guess < hi) {  // the previous beta splits the bracket first
        const int cg = cands.count_ge(n, guess);
        if (cg >= k) {
          lo = guess;
          c_lo = cg;
        } else {
          hi = guess;
        }
      }
      shrink([&](int t) { return cands.count_ge(n, t); }, lo, hi, c_lo, k, k);
      int beta = lo;
      if (c_lo == k) {
        int m = kIntMax;
        for (int i = 0; i < n; ++i) {
          const int x = cands.v(i);
          if (x >= lo) m = min(m, x);
        }
        beta = m;
      }
      guess = beta;
      // 3. the blocks reaching beta, rescored: their maxima in place (column of the first), the
      //    other scores >= beta appended
      const int n_j = cands.keep_ge(n, beta);
      RowSource<T, false> src;  // the thread's row in global memory (L2)
      src.global = reinterpret_cast<const uint4*>(weight + static_cast<std::size_t>(row) * d_in);
      src.shared = nullptr;
      int n_all = n_j;
      // kBatch blocks' loads in flight at once: each is an L2 round trip
      for (int i0 = 0; i0 < n_j; i0 += kBatch) {
        Raw8<T> w[kBatch];
        Norm8 z8[kBatch];
        int bb[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          bb[u] = i0 + u < n_j ? s_ix[(i0 + u) * kThreads + tid] : s_ix[i0 * kThreads + tid];
          w[u] = src.load(bb[u]);
          z8[u] = load_norm8(nrow, bb[u]);
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int i = i0 + u;
          if (i < n_j) {
            const int b = bb[u];
            const int bm = cands.v(i);
            int s[8];
            block_scores<T>(w[u], z8[u], s);
            bool first = true;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              if (first && s[e] == bm) {
                s_ix[i * kThreads + tid] = static_cast<unsigned short>(b * 8 + e);
                first = false;
              } else if (s[e] >= beta) {
                if (n_all < kListLen) {
                  s_val[n_all * kThreads + tid] = s[e];
                  s_ix[n_all * kThreads + tid] = static_cast<unsigned short>(b * 8 + e);
                }
                ++n_all;
              }
            }
          }
        }
      }
      if (n_all > kListLen) failed = true;  // more scores >= beta than the list holds
      // 4. drop the smallest while more than k remain
      int c = n_all;
      lo = beta;
      while (!failed && c > k) {
        int low = kIntMax, n_low = 0;  // the least value >= lo, and how many equal it
        for (int i = 0; i < n_all; ++i) {
          const int x = cands.v(i);
          if (x >= lo && x <= low) {
            n_low = x == low ? n_low + 1 : 1;
            low = x;
          }
        }
        if (c - n_low < k) {
          failed = true;  // equal scores straddle the k-th place: the warp path orders them
        } else {
          lo = low + 1;
          c -= n_low;
        }
      }
      if (!failed) {
        const float* zrow = ly.null_norms + static_cast<std::size_t>(v) * d_in;
        std::uint32_t* out_row = ly.out + (static_cast<std::size_t>(v / ly.T) * ly.d_out + row) * n_words;
        for (int i0 = 0; i0 < n_all; i0 += kBatch) {  // kBatch columns' loads in flight at once
          float wa[kBatch], za[kBatch];
          int cols[kBatch], xs[kBatch];
#pragma unroll
          for (int u = 0; u < kBatch; ++u) {
            const int i = min(i0 + u, n_all - 1);
            xs[u] = i0 + u < n_all ? cands.v(i) : -1;
            cols[u] = s_ix[i * kThreads + tid];
            wa[u] = src.abs_at(cols[u]);
            za[u] = __ldg(zrow + cols[u]);
          }
#pragma unroll
          for (int u = 0; u < kBatch; ++u) {
            if (xs[u] >= lo && __int_as_float(xs[u]) > __fmul_rn(wa[u], za[u]))
              atomicOr(out_row + (cols[u] >> 5), 1u << (cols[u] & 31));
          }
        }
      }
    }

    // the problems this path left: each solved by its whole warp
    unsigned left = __ballot_sync(kFullMask, on && failed);
    while (left) {
      const int l = __ffs(left) - 1;
      left &= left - 1u;
      const int r = row0 + l;
      RowSource<T, false> src;
      src.global = reinterpret_cast<const uint4*>(weight + static_cast<std::size_t>(r) * d_in);
      src.shared = nullptr;
      const float* zrow = ly.null_norms + static_cast<std::size_t>(v) * d_in;
      std::uint32_t* out_row = ly.out + (static_cast<std::size_t>(v / ly.T) * ly.d_out + r) * n_words;
      int gs = -1;
      solve_problem<T, NC, false>(true, nullptr, src, nrow, zrow, out_row, n_blocks, k, s_list + warp * kCap,
                                  s_scores + warp * kCap, lane, gs);
      if (lane == l) guess = gs;
      if (lane == 0 && launch.stats) atomicAdd(launch.stats, 1);
    }
  }
}

using TKernelFn = void (*)(TLaunch);

template <typename T>
TKernelFn thread_kernel_nc(int nc) {
  switch (nc) {
    case 5: return mask_thread_kernel<T, 5>;
    case 10: return mask_thread_kernel<T, 10>;
    case 20: return mask_thread_kernel<T, 20>;
    case 32: return mask_thread_kernel<T, 32>;
    default: throw std::logic_error("memorized_mask (thread): no kernel for " + std::to_string(nc) + " chunks");
  }
}

TKernelFn thread_kernel_for(DType dtype, int nc) {
  switch (dtype) {
    case DType::kFloat16: return thread_kernel_nc<__half>(nc);
    case DType::kBFloat16: return thread_kernel_nc<__nv_bfloat16>(nc);
    case DType::kFloat32: return thread_kernel_nc<float>(nc);
    default: throw std::invalid_argument("memorized_mask: weight must be float16, bfloat16 or float32");
  }
}

int thread_smem_bytes(DType dtype) {
  const int cols = kTileBytes / element_size(dtype);
  return 32 * kRowStride * 16 + kTW * cols * 4 + kListLen * kThreads * (4 + 2) + 2 * kTW * kCap * 4;
}

}  // namespace

bool memorized_mask_thread_eligible(const MaskLayerArgs& a) {
  // Opt-in only (MEMLOC_CUDA_MASK=thread, read per call): on an H100 it took 57.5 us per vector on
  // SD1.5's 16 layers x 1000 vectors against the warp kernel's 33.0 us (BENCHMARKS.md, tenth session).
  const char* env = std::getenv("MEMLOC_CUDA_MASK");
  const bool use = env != nullptr && std::strcmp(env, "thread") == 0;
  return use && a.d_in % 256 == 0 && a.d_in <= 8192 && a.k <= kMaxK && vector_kernel_args_ok(a);
}

void memorized_mask_thread(const std::vector<const MaskLayerArgs*>& layers, std::uintptr_t stream, int device,
                           std::uintptr_t stats) {
  if (layers.empty()) return;
  DeviceGuard guard(device);
  const int sms = sm_count(device);
  std::map<std::tuple<int, int>, std::vector<const MaskLayerArgs*>, std::greater<>> groups;  // (chunks, dtype)
  for (const MaskLayerArgs* a : layers) groups[{chunks_for(a->d_in), a->dtype}].push_back(a);
  for (const auto& [key, members] : groups) {
    const int nc = std::get<0>(key);
    const DType dtype = static_cast<DType>(std::get<1>(key));
    const TKernelFn kernel = thread_kernel_for(dtype, nc);
    const int smem = thread_smem_bytes(dtype);
    const std::int64_t resident = static_cast<std::int64_t>(blocks_per_sm(reinterpret_cast<const void*>(kernel), kTW, smem, device)) * sms;
    for (std::size_t first = 0; first < members.size(); first += kMaxLayersT) {
      const std::size_t last = std::min(members.size(), first + kMaxLayersT);
      std::int64_t row_groups = 0, max_vec = 1;
      for (std::size_t i = first; i < last; ++i) {
        row_groups += ceil_div(members[i]->d_out, 32);
        max_vec = std::max<std::int64_t>(max_vec, members[i]->S * members[i]->T);
      }
      // split the vectors until there are about 4 waves of blocks
      const std::int64_t pieces = std::clamp<std::int64_t>(ceil_div(4 * resident, row_groups), 1, max_vec);
      TLaunch launch{};
      launch.n_layers = static_cast<int>(last - first);
      launch.stats = reinterpret_cast<int*>(stats);
      std::int64_t items = 0;
      for (std::size_t i = first; i < last; ++i) {
        const MaskLayerArgs& a = *members[i];
        VecLayer& l = launch.layers[i - first];
        fill_mask_layer(l, a);
        l.n_vec = static_cast<int>(a.S * a.T);
        l.span = static_cast<int>(ceil_div(ceil_div(l.n_vec, std::min<std::int64_t>(pieces, l.n_vec)), kTW) * kTW);
        l.n_spans = static_cast<int>(ceil_div(l.n_vec, l.span));
        l.item_begin = static_cast<int>(items);
        items += ceil_div(a.d_out, 32) * l.n_spans;
      }
      MEMLOC_REQUIRE(items < (1LL << 31), "memorized_mask: too many work items in one launch");
      kernel<<<static_cast<unsigned>(items), kThreads, smem, as_stream(stream)>>>(launch);
      MEMLOC_CUDA_CHECK_LAUNCH();
    }
  }
}

}  // namespace memloc::cuda
