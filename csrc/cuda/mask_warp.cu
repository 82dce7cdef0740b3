// memorized_mask, warp kernel: one warp per (weight row, norm vector); the row's 8-column block
// maxima stay in registers, so the selection never touches global scratch.
//
// Lane l owns, in chunk i, the 8-column block b = 32 i + l (columns 8b .. 8b + 7: one 16-byte load
// of f16/bf16 weights, two of norms). Per (row, vector):
//  1. pass 1: scores |W| * norm (the reference's float32 bits), the maximum of every block into
//     bm[i] (NC registers per lane);
//  2. bound: a bisection on the block maxima's bits (REDUX counts) until lo has k to kCap blocks
//     with maximum >= lo. Every top-k score lies in such a block (its maximum is >= the score >=
//     the k-th largest score >= the k-th largest block maximum >= lo). Warm start: the first probe
//     sits a quarter octave below the k-th largest block maximum of the row's previous vector:
//     k-th order statistics of thousands of scores move little between vectors, so that probe
//     usually lands in the window at once; else the bisection goes on from it (any probe keeps the
//     invariant count(lo) >= k > count(hi)). MEMLOC_CUDA_MASK_WARM=0 turns it off (an ablation);
//  3. those blocks are listed (a warp scan of per-lane counts) and gathered, at most 4 per lane
//     (32 scores in registers), recomputed with the same operations (bit-identical);
//  4. lo is raised to the k-th largest listed block maximum (bisection on 4 values per lane),
//     then the smallest scores >= lo are dropped one distinct value at a time while more than k
//     remain: that ends at exactly k scores >= lo, or at a tie straddling the k-th place. The
//     scores >= lo (k and a few more) are first listed in shared memory with their columns
//     (compact selection), so each drop scans at most 4 per lane instead of all 32 gathered; when
//     more than kCap scores reach the raised lo, the drops run over the 32 gathered scores in
//     registers instead;
//  5. the null comparison on the k selected, one fire-and-forget atomicOr per column (per block in
//     the register fallback; OR is order-free, so the union over timesteps is free).
// A problem the fast path cannot decide (more than kCap blocks share the values around the k-th
// place, fewer than k non-negative block maxima, or equal scores straddling the k-th place) runs
// an exact bisection over the whole row in the same warp (32 passes, ties to the lower column by a
// column-ordered scan) and is counted in `stats` when given.
//
// Non-negative floats (and NaN, above +inf, as in torch.topk) order like their int32 bits, so all
// comparisons are on int32; padding is -1. Batched launches (several vectors per warp) first copy
// each warp's weight row to shared memory (kStage), so that W is read from HBM once per item. One
// launch per (chunks, dtype, staging) group; when a call has more than one, the launches after the
// first go to two side streams forked from and joined into the caller's stream
// (MEMLOC_CUDA_MASK_STREAMS=0: all on the caller's stream). MEMLOC_CUDA_MASK_WARPS sets the rows
// (warps) per block, MEMLOC_CUDA_MASK=block|warp which kernel eligible layers take. Unstaged
// launches run kernels compiled for 80 registers (kUnstagedMinBlocks; MEMLOC_CUDA_MASK_MINBLOCKS=2:
// 128), staged ones 128 (shared memory limits them to 4 blocks per SM anyway).
//
// Bound path (mask_bound_kernel; batched calls given the norms' pair maxima, k <= 64): pass 1 reads
// no W and no norms. Each warp stages its row's pair maxima of |W| (float32, 16 bytes per block),
// and per vector multiplies them by the vector's pair maxima of the norms (pair_norms.cu): an upper
// bound of each block's maximum score in 4 products and 2 three-way maxima per 8 columns. A window
// search (gallop from the previous vector's bound, then bisection) finds lo with min(3 k, 104) to
// 128 bounds >= lo; those blocks are listed and gathered exactly (W from L1/L2); if their exact
// maxima show k blocks >= lo, every top-k score is among them and steps 4-5 run as above, else the
// problem runs the block-maxima path (counted in stats[1]). Nsight Compute, batched width-20 launch
// on an H100: 11.5 % fewer instructions than the block-maxima path, 6 % less time; both are bound
// by the L1/L2 pipelines (82-84 % busy), not by issue (48-51 %). MEMLOC_CUDA_MASK_BOUNDS=0 (read in
// Python) turns it off.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"
#include "mask_warp.h"
#include "mask_warp.cuh"

namespace memloc::cuda {
namespace {

constexpr int kWarps = 8;            // warps (rows) per block at most: they share each norm row in L1
constexpr int kDefaultWarps = 4;     // H100, SD1.5: 63.5 us with 4, 64.8 with 8 (BENCHMARKS.md)
// Unstaged launches at 80 registers: 6 blocks (24 warps) per SM instead of 4 (16); ptxas spills
// nothing for f16/bf16 up to 20 chunks. H100, SD1.5 single vector: 59.92 / 59.75 us against 60.90 /
// 60.72 at 128 registers (64 registers, 8 blocks: 60.42 / 60.38; fourteenth session, BENCHMARKS.md).
constexpr int kUnstagedMinBlocks = 3;
constexpr int kMaxLayers = 48;
constexpr int kMaxStageBytes = 96 * 1024;
// The bound path lists at most kCap blocks, and pair bounds need about 1.7 k of them to show k
// scores: with k above this, nearly every problem would leave it (measured: k = 81 at d_in 8192).
// memloc_kernels/backends/cuda.py (_bound_path_takes) computes pair maxima only up to this k.
constexpr int kBoundMaxK = 64;
// Whether eligible layers take this kernel when MEMLOC_CUDA_MASK is unset ("warp": yes, "block": no).
constexpr bool kWarpByDefault = true;

struct WLaunch {
  VecLayer layers[kMaxLayers];
  int n_layers;
  int warps;   // rows per block (blockDim.x / 32), at most kWarps
  int* stats;  // problems that took the exact path (may be null)
  int warm;    // start each vector's bound search from the previous vector's (MEMLOC_CUDA_MASK_WARM)
};
static_assert(sizeof(WLaunch) <= 4000, "the layer table must fit the kernel parameter space");

// The layer of this block's work item, and the item's index within the layer.
__device__ __forceinline__ const VecLayer& item_layer(const WLaunch& launch, int& item) {
  const int item_id = static_cast<int>(blockIdx.x);
  int li = 0;
  while (li + 1 < launch.n_layers && item_id >= launch.layers[li + 1].item_begin) ++li;
  item = item_id - launch.layers[li].item_begin;
  return launch.layers[li];
}

// kMinBlocks: resident 8-warp blocks per SM the register allocation must allow (2: 128 registers per
// thread; 3: 80). Staged launches keep 2 (shared memory allows no more blocks); unstaged ones (single
// vectors) take kUnstagedMinBlocks.
template <typename T, int NC, bool kStage, int kMinBlocks = 2>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks) mask_warp_kernel(const __grid_constant__ WLaunch launch) {
  extern __shared__ uint4 s_rows[];  // kStage: each warp's weight row
  __shared__ int s_list[kWarps][kCap];
  __shared__ int s_scores[kWarps][kCap];  // the scores of the compact list
  constexpr int kQ = sizeof(T) / 2;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  int item;
  const VecLayer& ly = item_layer(launch, item);
  const int row = (item / ly.n_spans) * launch.warps + warp;
  if (row >= ly.d_out) return;  // no block-wide barrier below: each warp works alone
  const int d_in = ly.d_in;
  const int k = ly.k;
  const int n_blocks = d_in >> 3;
  const int n_words = (d_in + 31) >> 5;
  const int v_begin = (item % ly.n_spans) * ly.span;
  const int v_end = min(v_begin + ly.span, ly.n_vec);
  int guess = -1;  // warm start: the k-th largest block maximum of this row's previous vector

  RowSource<T, kStage> src;
  src.global = reinterpret_cast<const uint4*>(static_cast<const T*>(ly.weight) + static_cast<std::size_t>(row) * d_in);
  src.shared = s_rows + static_cast<std::size_t>(warp) * NC * 32 * kQ;
  if (kStage) {
    uint4* mine = s_rows + static_cast<std::size_t>(warp) * NC * 32 * kQ;
    for (int i = lane; i < n_blocks * kQ; i += 32) mine[i] = __ldg(src.global + i);
    __syncwarp();
  }
  for (int v = v_begin; v < v_end; ++v) {
    const float* nrow = ly.norms + static_cast<std::size_t>(v) * d_in;
    const float* zrow = ly.null_norms + static_cast<std::size_t>(v) * d_in;
    std::uint32_t* out_row = ly.out + (static_cast<std::size_t>(v / ly.T) * ly.d_out + row) * n_words;
    solve_problem<T, NC, kStage>(launch.warm != 0, launch.stats, src, nrow, zrow, out_row, n_blocks, k, s_list[warp],
                                 s_scores[warp], lane, guess);
  }
}

// Batched launches with the norms' pair maxima: the bound path (mask_warp.cuh, solve_problem_bounds).
// Each warp stages its row's pair maxima of |W| (16 bytes per 8 columns, as much as an f16 row)
// and reads W itself from global memory (L1/L2) for the listed blocks.
template <typename T, int NC>
__global__ void __launch_bounds__(kWarps * 32, 2) mask_bound_kernel(const __grid_constant__ WLaunch launch) {
  extern __shared__ float4 s_pairs[];  // each warp's pair maxima of |W|, one float4 per block
  __shared__ int s_list[kWarps][kCap];
  __shared__ int s_scores[kWarps][kCap];
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  int item;
  const VecLayer& ly = item_layer(launch, item);
  const int row = (item / ly.n_spans) * launch.warps + warp;
  if (row >= ly.d_out) return;  // no block-wide barrier below: each warp works alone
  const int d_in = ly.d_in;
  const int k = ly.k;
  const int n_blocks = d_in >> 3;
  const int n_words = (d_in + 31) >> 5;
  const int v_begin = (item % ly.n_spans) * ly.span;
  const int v_end = min(v_begin + ly.span, ly.n_vec);
  int guess = -1;   // the block-maxima path's warm start (as in mask_warp_kernel)
  int wguess = -1;  // the bound path's: the previous vector's lo

  RowSource<T, false> src;
  src.global = reinterpret_cast<const uint4*>(static_cast<const T*>(ly.weight) + static_cast<std::size_t>(row) * d_in);
  src.shared = nullptr;
  float4* wpair = s_pairs + static_cast<std::size_t>(warp) * NC * 32;
  for (int b = lane; b < n_blocks; b += 32) wpair[b] = weight_pair_maxima<T>(src.load(b));
  __syncwarp();
  for (int v = v_begin; v < v_end; ++v) {
    const float* nrow = ly.norms + static_cast<std::size_t>(v) * d_in;
    const float* zrow = ly.null_norms + static_cast<std::size_t>(v) * d_in;
    const float4* npair = ly.pair_norms + static_cast<std::size_t>(v) * n_blocks;
    std::uint32_t* out_row = ly.out + (static_cast<std::size_t>(v / ly.T) * ly.d_out + row) * n_words;
    solve_problem_bounds<T, NC>(launch.warm != 0, launch.stats, src, wpair, npair, nrow, zrow, out_row, n_blocks, k,
                                s_list[warp], s_scores[warp], lane, guess, wguess);
  }
}

using KernelFn = void (*)(WLaunch);

// How a launch reads W: from global memory, staged in shared memory, or the bound path.
enum Mode : int { kGlobal = 0, kStaged = 1, kBounds = 2 };

template <typename T>
KernelFn bound_kernel_for_nc(int nc) {
  switch (nc) {
    case 5: return mask_bound_kernel<T, 5>;
    case 10: return mask_bound_kernel<T, 10>;
    case 20: return mask_bound_kernel<T, 20>;
    case 32: return mask_bound_kernel<T, 32>;
    default: throw std::logic_error("memorized_mask (warp): no kernel for " + std::to_string(nc) + " chunks");
  }
}

template <typename T, bool kStage, int kMinBlocks = 2>
KernelFn kernel_for_nc(int nc) {
  switch (nc) {
    case 5: return mask_warp_kernel<T, 5, kStage, kMinBlocks>;
    case 10: return mask_warp_kernel<T, 10, kStage, kMinBlocks>;
    case 20: return mask_warp_kernel<T, 20, kStage, kMinBlocks>;
    case 32: return mask_warp_kernel<T, 32, kStage, kMinBlocks>;
    default: throw std::logic_error("memorized_mask (warp): no kernel for " + std::to_string(nc) + " chunks");
  }
}

template <typename T>
KernelFn kernel_for_mode(int nc, int mode, int min_blocks) {
  if (mode == kBounds) return bound_kernel_for_nc<T>(nc);
  if (mode == kStaged) return kernel_for_nc<T, true>(nc);
  return min_blocks == 2 ? kernel_for_nc<T, false, 2>(nc) : kernel_for_nc<T, false, kUnstagedMinBlocks>(nc);
}

KernelFn kernel_for(DType dtype, int nc, int mode, int min_blocks) {
  switch (dtype) {
    case DType::kFloat16: return kernel_for_mode<__half>(nc, mode, min_blocks);
    case DType::kBFloat16: return kernel_for_mode<__nv_bfloat16>(nc, mode, min_blocks);
    case DType::kFloat32: return kernel_for_mode<float>(nc, mode, min_blocks);
    default: throw std::invalid_argument("memorized_mask: weight must be float16, bfloat16 or float32");
  }
}

// Knobs read per call (tests and benchmarks switch them): MEMLOC_CUDA_MASK_WARM=0 turns the warm
// start off; MEMLOC_CUDA_MASK_STREAMS=0 keeps every launch on the caller's stream.
bool env_is(const char* name, const char* value) {
  const char* env = std::getenv(name);
  return env != nullptr && std::strcmp(env, value) == 0;
}
bool warm_start() { return !env_is("MEMLOC_CUDA_MASK_WARM", "0"); }
bool side_streams_on() { return !env_is("MEMLOC_CUDA_MASK_STREAMS", "0"); }
// MEMLOC_CUDA_MASK_MINBLOCKS=2: unstaged launches take the 128-register kernels (an ablation).
int unstaged_min_blocks() { return env_is("MEMLOC_CUDA_MASK_MINBLOCKS", "2") ? 2 : kUnstagedMinBlocks; }

int stage_bytes(DType dtype, int nc, int warps) { return warps * nc * 256 * element_size(dtype); }
int bound_bytes(int nc, int warps) { return warps * nc * 32 * static_cast<int>(sizeof(float4)); }

// Rows per block: kDefaultWarps, or MEMLOC_CUDA_MASK_WARPS (1..8, a tuning knob read per call).
int block_warps() {
  const char* env = std::getenv("MEMLOC_CUDA_MASK_WARPS");
  const int w = env != nullptr ? std::atoi(env) : kDefaultWarps;
  return std::clamp(w, 1, kWarps);
}

// Calls with more than one launch (width groups): the launches after the first go to two side
// streams that fork from the caller's stream and join back into it, so that one launch's last wave
// overlaps the next one (unless MEMLOC_CUDA_MASK_STREAMS=0).
constexpr int kSideStreams = 2;
struct SideStreams {
  cudaStream_t stream[kSideStreams];
  cudaEvent_t fork, join[kSideStreams];
};
std::mutex side_mutex;  // held from fork to join: the events are shared
SideStreams& side_streams(int device) {
  static std::map<int, SideStreams> all;
  auto it = all.find(device);
  if (it == all.end()) {
    SideStreams s{};
    for (int i = 0; i < kSideStreams; ++i) {
      MEMLOC_CUDA_CHECK(cudaStreamCreateWithFlags(&s.stream[i], cudaStreamNonBlocking));
      MEMLOC_CUDA_CHECK(cudaEventCreateWithFlags(&s.join[i], cudaEventDisableTiming));
    }
    MEMLOC_CUDA_CHECK(cudaEventCreateWithFlags(&s.fork, cudaEventDisableTiming));
    it = all.emplace(device, s).first;
  }
  return it->second;
}

}  // namespace

bool memorized_mask_warp_eligible(const MaskLayerArgs& a) {
  const char* env = std::getenv("MEMLOC_CUDA_MASK");  // read per call: tests and benchmarks switch it
  const bool use = env == nullptr || env[0] == '\0' ? kWarpByDefault : std::strcmp(env, "block") != 0;
  return use && a.d_in % 8 == 0 && chunks_for(a.d_in) > 0 && a.k <= kCap - 32 && vector_kernel_args_ok(a);
}

void memorized_mask_warp(const std::vector<const MaskLayerArgs*>& layers, std::uintptr_t stream, int device,
                         std::uintptr_t stats) {
  if (layers.empty()) return;
  DeviceGuard guard(device);
  const int sms = sm_count(device);
  const int warps = block_warps();
  // One launch per (chunks, dtype, mode); the widest rows first. Batched layers take the bound
  // path when given the norms' pair maxima, else stage W when it fits.
  std::map<std::tuple<int, int, int>, std::vector<const MaskLayerArgs*>, std::greater<>> groups;
  for (const MaskLayerArgs* a : layers) {
    const int nc = chunks_for(a->d_in);
    int mode = kGlobal;
    if (a->S * a->T > 1 && a->pair_norms != 0 && a->pair_norms % 16 == 0 && a->k <= kBoundMaxK &&
        bound_bytes(nc, warps) <= kMaxStageBytes)
      mode = kBounds;
    else if (a->S * a->T > 1 && stage_bytes(static_cast<DType>(a->dtype), nc, warps) <= kMaxStageBytes)
      mode = kStaged;
    groups[{nc, a->dtype, mode}].push_back(a);
  }
  const bool fork = groups.size() > 1 && side_streams_on();
  std::unique_lock<std::mutex> side_lock(side_mutex, std::defer_lock);
  SideStreams* side = nullptr;
  if (fork) {
    side_lock.lock();
    side = &side_streams(device);
    MEMLOC_CUDA_CHECK(cudaEventRecord(side->fork, as_stream(stream)));
    for (int i = 0; i < kSideStreams; ++i) MEMLOC_CUDA_CHECK(cudaStreamWaitEvent(side->stream[i], side->fork, 0));
  }
  int group = 0;
  for (const auto& [key, members] : groups) {
    const cudaStream_t launch_stream = fork && group > 0 ? side->stream[(group - 1) % kSideStreams] : as_stream(stream);
    ++group;
    const int nc = std::get<0>(key);
    const DType dtype = static_cast<DType>(std::get<1>(key));
    const int mode = std::get<2>(key);
    const int smem = mode == kStaged ? stage_bytes(dtype, nc, warps) : mode == kBounds ? bound_bytes(nc, warps) : 0;
    const KernelFn kernel = kernel_for(dtype, nc, mode, unstaged_min_blocks());
    const std::int64_t resident = static_cast<std::int64_t>(blocks_per_sm(reinterpret_cast<const void*>(kernel), warps, smem, device)) * sms;
    for (std::size_t first = 0; first < members.size(); first += kMaxLayers) {
      const std::size_t last = std::min(members.size(), first + kMaxLayers);
      std::int64_t groups_of_rows = 0, max_vec = 1;
      for (std::size_t i = first; i < last; ++i) {
        max_vec = std::max<std::int64_t>(max_vec, members[i]->S * members[i]->T);
        groups_of_rows += ceil_div(members[i]->d_out, warps);
      }
      // split the vectors until there are about 4 waves of blocks
      const std::int64_t pieces = std::clamp<std::int64_t>(ceil_div(4 * resident, groups_of_rows), 1, max_vec);
      WLaunch launch{};
      launch.n_layers = static_cast<int>(last - first);
      launch.warps = warps;
      launch.stats = reinterpret_cast<int*>(stats);
      launch.warm = warm_start() ? 1 : 0;
      std::int64_t items = 0;
      for (std::size_t i = first; i < last; ++i) {
        const MaskLayerArgs& a = *members[i];
        VecLayer& l = launch.layers[i - first];
        fill_mask_layer(l, a);
        l.n_vec = static_cast<int>(a.S * a.T);
        l.span = static_cast<int>(ceil_div(l.n_vec, std::min<std::int64_t>(pieces, l.n_vec)));
        l.n_spans = static_cast<int>(ceil_div(l.n_vec, l.span));
        l.item_begin = static_cast<int>(items);
        l.pair_norms = mode == kBounds ? reinterpret_cast<const float4*>(a.pair_norms) : nullptr;
        items += ceil_div(a.d_out, warps) * l.n_spans;
      }
      MEMLOC_REQUIRE(items < (1LL << 31), "memorized_mask: too many work items in one launch");
      kernel<<<static_cast<unsigned>(items), warps * 32, smem, launch_stream>>>(launch);
      MEMLOC_CUDA_CHECK_LAUNCH();
    }
  }
  if (fork) {
    for (int i = 0; i < kSideStreams; ++i) {
      MEMLOC_CUDA_CHECK(cudaEventRecord(side->join[i], side->stream[i]));
      MEMLOC_CUDA_CHECK(cudaStreamWaitEvent(as_stream(stream), side->join[i], 0));
    }
  }
}

}  // namespace memloc::cuda
