// Shared by the memorized_mask kernels that solve one (row, vector) problem per warp or per thread
// (mask_warp.cu, mask_thread.cu): raw 8-column loads, the reference's score bits, the warp kernel's
// per-problem code (solve_problem, with its exact path), and host-side launch helpers.
#pragma once

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"

namespace memloc::cuda {
namespace {

constexpr int kCap = 128;  // listed blocks at most (kSlots per lane)
constexpr int kSlots = kCap / 32;
constexpr int kIntMax = 0x7fffffff;
// Warm start: the first probe sits this many float32 bits (1/4 octave, a factor 0.84) below the
// previous vector's k-th largest block maximum, so that typically 1.5 k block maxima reach it.
constexpr int kWarmDrop = 1 << 21;

// One layer of a launch's table: a block (work item) takes a group of rows (the warp kernel's
// `warps`, the thread kernel's 32) and a span of the layer's norm vectors.
struct VecLayer {
  const void* weight;
  const float* norms;
  const float* null_norms;
  std::uint32_t* out;
  int d_out, d_in, k, T;
  int n_vec;       // S * T norm vectors
  int span;        // vectors per work item
  int n_spans;     // work items per group of rows
  int item_begin;  // first work item (block) of this layer in the launch
  const float4* pair_norms;  // the warp kernel's bound path: [n_vec][d_in / 8] (else null)
};

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
  // |W| of one column as float32
  __device__ __forceinline__ float abs_at(int col) const {
    const T* row = reinterpret_cast<const T*>(kStage ? shared : global);
    return fabsf(to_float<T>(kStage ? row[col] : __ldg(row + col)));
  }
};

// Score bits of the 8 columns of a block (the reference's float32 product).
template <typename T>
__device__ __forceinline__ void block_scores(const Raw8<T>& w, const Norm8& n, int (&s)[8]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) s[j] = __float_as_int(__fmul_rn(abs_elem<T>(w, j), n[j]));
}

// Pass 1: the maximum score of each of the lane's blocks, at least -1 (-1 past the row). Loads are
// clamped to a real block, so the pass is branch-free. (Kernels for rows that fill all NC chunks,
// with compile-time offsets and nothing clamped, cut pass 1 from 667 to 512 instructions at NC = 20
// but measured no faster: twelfth session, BENCHMARKS.md.)
template <typename T, int NC, bool kStage>
__device__ __forceinline__ void block_maxima(const RowSource<T, kStage>& src, const float* nrow, int n_blocks,
                                             int lane, int (&bm)[NC]) {
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    const int b = i * 32 + lane;
    const int bc = min(b, n_blocks - 1);
    int s[8];
    block_scores<T>(src.load(bc), load_norm8(nrow, bc), s);
    int m = -1;  // also clamps the negative bits of -0.0 / negative-NaN scores to -1 (count_below)
#pragma unroll
    for (int j = 0; j < 8; ++j) m = max(m, s[j]);
    bm[i] = b < n_blocks ? m : -1;
  }
}

// a[j] for a run-time j without indexing the registers (which would move `a` to local memory).
__device__ __forceinline__ int pick8(const int (&a)[8], int j) {
  const bool b0 = j & 1, b1 = j & 2, b2 = j & 4;
  const int x01 = b0 ? a[1] : a[0], x23 = b0 ? a[3] : a[2], x45 = b0 ? a[5] : a[4], x67 = b0 ? a[7] : a[6];
  const int x03 = b1 ? x23 : x01, x47 = b1 ? x67 : x45;
  return b2 ? x47 : x03;
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
    const int incl = warp_inclusive_sum(mine, lane);
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

// How many of the values v[0..N) lie below t, for values >= -1 and 0 <= t < 2^31: then v - t as
// 32-bit unsigned has its top bit set exactly when v < t, so each value costs a subtraction and a
// shift-add (a compare-and-increment chain costs three dependent instructions). Two sums halve
// the dependency chain.
template <int N>
__device__ __forceinline__ int count_below(const int (&v)[N], int t) {
  unsigned a = 0u, b = 0u;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const unsigned top = (static_cast<unsigned>(v[i]) - static_cast<unsigned>(t)) >> 31;
    if (i % 2) b += top; else a += top;
  }
  return static_cast<int>(a + b);
}

// The warp kernel's bracket shrink (as `shrink` below, in 32-bit arithmetic): needs
// 0 <= lo < hi <= 2^31, which the fast path's bracket satisfies (some block maximum >= lo >= 0).
template <typename Count>
__device__ __forceinline__ void bisect(Count&& count, int& lo, long long& hi, int& c_lo, int k, int stop) {
  unsigned top = static_cast<unsigned>(hi);
  while (c_lo > stop && top - static_cast<unsigned>(lo) > 1u) {
    const int mid = lo + static_cast<int>((top - static_cast<unsigned>(lo)) >> 1);
    const int c = count(mid);
    if (c >= k) {
      lo = mid;
      c_lo = c;
    } else {
      top = static_cast<unsigned>(mid);
    }
  }
  hi = top;
}

// Shrinks the bracket (c_lo = count(lo) >= k > count(hi)) by halving it while more than
// `stop` values reach lo and it holds a value between its ends.
template <typename Count>
__device__ __forceinline__ void shrink(Count&& count, int& lo, long long& hi, int& c_lo, int k, int stop) {
  while (c_lo > stop && hi - lo > 1) {
    const int mid = static_cast<int>(lo + (hi - lo) / 2);
    const int c = count(mid);
    if (c >= k) {
      lo = mid;
      c_lo = c;
    } else {
      hi = mid;
    }
  }
}

// Compact selection, after the list of the c_sel scores >= lo (columns in `cols`, scores in
// `scores`, c_sel <= kCap): drop the smallest while more than k remain, then the null comparison
// and one OR per column. False when equal scores straddle the k-th place (nothing written).
template <typename T, bool kStage>
__device__ __forceinline__ bool compact_finish(const RowSource<T, kStage>& src, const float* zrow,
                                               std::uint32_t* out_row, const int* cols, const int* scores,
                                               int c_sel, int k, int lo, int lane) {
  int cs[kSlots], cc[kSlots];
#pragma unroll
  for (int q = 0; q < kSlots; ++q) {
    const int slot = q * 32 + lane;
    cs[q] = slot < c_sel ? scores[slot] : -1;
    cc[q] = slot < c_sel ? cols[slot] : 0;
  }
  __syncwarp();  // read before the next vector rewrites them
  int c = c_sel;
  while (c > k) {
    int m = kIntMax;
#pragma unroll
    for (int q = 0; q < kSlots; ++q) m = min(m, cs[q] >= lo ? cs[q] : kIntMax);
    const int low = __reduce_min_sync(kFullMask, m);
    int n_low = 0;
#pragma unroll
    for (int q = 0; q < kSlots; ++q) n_low += cs[q] == low ? 1 : 0;
    n_low = warp_count(n_low);
    if (c - n_low < k) return false;  // equal scores straddle the k-th place: the exact path orders them
    lo = low + 1;
    c -= n_low;
  }
#pragma unroll
  for (int q = 0; q < kSlots; ++q) {
    const int col = cc[q];
    if (cs[q] >= lo && __int_as_float(cs[q]) > __fmul_rn(src.abs_at(col), __ldg(zrow + col)))
      atomicOr(out_row + (col >> 5), 1u << (col & 31));
  }
  return true;
}

enum : int { kSolved = 0, kExact = 1, kLoose = 2 };

// Steps 3-5 for the blocks whose key reaches lo (n_listed of them, k <= n_listed <= kCap; hi:
// count(key >= hi) < k). Keys are the block maxima (every listed block holds a score >= lo), or,
// with kBounds, upper bounds of them: then the gathered maxima must show k blocks >= lo, else
// kLoose (nothing written). kExact: the caller runs the exact path (nothing written).
template <typename T, int NC, bool kStage, bool kBounds>
__device__ __forceinline__ int select_listed(const RowSource<T, kStage>& src, const int (&key)[NC], const float* nrow,
                                             const float* zrow, std::uint32_t* out_row, int k, int lo, long long hi,
                                             int n_listed, int* list, int* scores, int lane, bool warm, int& guess) {
  int c_lo = n_listed;
  // 3. list the blocks reaching lo (lane-major), gather their scores
  unsigned hits = 0u;
#pragma unroll
  for (int i = 0; i < NC; ++i) hits |= (key[i] >= lo ? 1u : 0u) << i;
  const int mine = __popc(hits);
  const int incl = warp_inclusive_sum(mine, lane);
  int pos = incl - mine;
  while (hits) {
    const int i = __ffs(hits) - 1;
    hits &= hits - 1u;
    list[pos++] = i * 32 + lane;
  }
  __syncwarp();
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
    // warp-uniform: skip slot groups nobody holds (the bound path lists 3 k or more blocks and
    // reads W from L2: loading all groups at once hides the latency better than skipping)
    if (kBounds || q * 32 < n_listed) {
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
  auto count_bmx = [&](int t) { return warp_count(kSlots - count_below(bmx, t)); };  // bmx >= -1
  if (kBounds) {  // keys were bounds: the listed blocks hold every score >= lo; are k of them >= lo?
    c_lo = count_bmx(lo);
    if (c_lo < k) return kLoose;
    int m = -1;
#pragma unroll
    for (int q = 0; q < kSlots; ++q) m = max(m, bmx[q]);
    hi = static_cast<long long>(__reduce_max_sync(kFullMask, m)) + 1;
  }
  bisect(count_bmx, lo, hi, c_lo, k, k);
  if (c_lo == k) {  // exactly k blocks reach lo: raise it to the least of their maxima
    int m = kIntMax;
#pragma unroll
    for (int q = 0; q < kSlots; ++q) m = min(m, bmx[q] >= lo ? bmx[q] : kIntMax);
    lo = __reduce_min_sync(kFullMask, m);
  }
  if (warm) guess = lo;

  // 4b-5. the scores >= lo (k and typically a few more) are listed in shared memory with their
  // columns, at most kSlots per lane; then compact_finish. More than kCap such scores: the
  // register drop loop below.
  unsigned sel[kSlots];
  int n_sel = 0;
#pragma unroll
  for (int q = 0; q < kSlots; ++q) {
    sel[q] = 0u;
#pragma unroll
    for (int j = 0; j < 8; ++j) sel[q] |= (sc[q][j] >= lo ? 1u : 0u) << j;
    n_sel += __popc(sel[q]);
  }
  const int upto = warp_inclusive_sum(n_sel, lane);
  const int c_sel = __shfl_sync(kFullMask, upto, 31);
  if (c_sel <= kCap) {
    int at = upto - n_sel;
#pragma unroll
    for (int q = 0; q < kSlots; ++q) {
      unsigned m = sel[q];
      while (m) {
        const int j = __ffs(m) - 1;
        m &= m - 1u;
        list[at] = blk[q] * 8 + j;
        scores[at] = pick8(sc[q], j);
        ++at;
      }
    }
    __syncwarp();
    return compact_finish<T, kStage>(src, zrow, out_row, list, scores, c_sel, k, lo, lane) ? kSolved : kExact;
  } else {
    // 4b, fallback: drop the smallest gathered scores >= lo while more than k remain. (c_s is
    // recounted although it equals c_sel: in this form ptxas (nvcc 13.0) spilled least when it
    // was written.)
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
      return kSolved;
    }
    return kExact;
  }
}

// One (row, vector) problem, steps 1-5 of the header. `guess`: the warm start, read and (when
// `warm`) updated (-1: none). `stats`: the exact-path counter (may be null).
template <typename T, int NC, bool kStage>
__device__ __forceinline__ void solve_problem(bool warm, int* stats, const RowSource<T, kStage>& src,
                                              const float* nrow, const float* zrow, std::uint32_t* out_row,
                                              int n_blocks, int k, int* list, int* scores, int lane, int& guess) {
  // 1. block maxima
  int bm[NC];
  block_maxima<T, NC, kStage>(src, nrow, n_blocks, lane, bm);
  auto count_bm = [&](int t) { return warp_count(NC - count_below(bm, t)); };  // t >= 0 at every call

  // 2. a bound lo reached by k to kCap block maxima: from the warm guess (a little below the
  //    previous vector's k-th largest block maximum), else 8 octaves below the top
  int lmax = bm[0];
#pragma unroll
  for (int i = 1; i < NC; ++i) lmax = max(lmax, bm[i]);
  const int top = __reduce_max_sync(kFullMask, lmax);
  long long hi = static_cast<long long>(top) + 1;  // count(>= hi) == 0 < k (NaN bits are INT_MAX)
  int lo = 0, c_lo = 0;
  bool started = false;
  if (guess >= 0) {
    const int t = max(guess - kWarmDrop, 0);
    const int c = t < hi ? count_bm(t) : 0;
    if (c >= k) {
      lo = t;
      c_lo = c;
      started = true;
    } else if (t < hi) {
      hi = t;
    }
  }
  if (!started) {
    lo = max(static_cast<int>(hi - 1) - (8 << 23), 0);
    c_lo = count_bm(lo);
    if (c_lo < k) {
      hi = max(lo, 1);
      lo = 0;
      c_lo = count_bm(0);
    }
  }
  bool fast = c_lo >= k;
  if (fast) bisect(count_bm, lo, hi, c_lo, k, kCap);
  fast = fast && c_lo <= kCap;

  if (fast && select_listed<T, NC, kStage, false>(src, bm, nrow, zrow, out_row, k, lo, hi, c_lo, list, scores, lane,
                                                 warm, guess) == kSolved)
    return;
  if (lane == 0 && stats) atomicAdd(stats, 1);
  exact_row<T, kStage>(src, nrow, zrow, out_row, n_blocks, k, lane);
}

// --- the bound path (batched launches): block bounds from pair maxima -------------------------
// A score |w_j| * n_j (float32, rounded) is at most fl(max(|w_j|, |w_j'|) * max(n_j, n_j')) for the
// column pair (j, j'), since rounding is monotone; a non-finite |w| or n in the pair is taken as
// NaN, so that the bound is NaN (INT_MAX bits, above every score) wherever 0 * inf could make a NaN
// score. The row's pair maxima of |W| are staged once per work item; the vector's pair maxima of the
// norms are an input (computed once per vector for all rows of the layer). A block's bound is the
// largest of its 4 pair bounds: 4 products and 2 three-way maxima per 8 columns, where pass 1 of
// solve_problem takes 8 conversions, 8 products and 8 maxima (and 3 loads instead of 2).

// The 4 pair maxima of |w| of a block, a non-finite one as NaN.
template <typename T>
__device__ __forceinline__ float4 weight_pair_maxima(const Raw8<T>& w) {
  float m[4];
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const int a = max(__float_as_int(abs_elem<T>(w, 2 * p)), __float_as_int(abs_elem<T>(w, 2 * p + 1)));
    m[p] = __int_as_float(a >= 0x7f800000 ? kIntMax : a);
  }
  return make_float4(m[0], m[1], m[2], m[3]);
}

// The bound of each of the lane's blocks, at least -1 (-1 past the row).
template <int NC>
__device__ __forceinline__ void block_bounds(const float4* wpair, const float4* npair, int n_blocks, int lane,
                                             int (&ub)[NC]) {
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    const int b = i * 32 + lane;
    const int bc = min(b, n_blocks - 1);
    const float4 w = wpair[bc];
    const float4 n = __ldg(npair + bc);
    const int u = __vimax3_s32(__float_as_int(__fmul_rn(w.x, n.x)), __float_as_int(__fmul_rn(w.y, n.y)),
                               __float_as_int(__fmul_rn(w.z, n.z)));
    ub[i] = b < n_blocks ? __vimax3_s32(u, __float_as_int(__fmul_rn(w.w, n.w)), -1) : -1;
  }
}

// Gallop step of the bound window search (float32 bits: 1/16 octave, a factor 0.96).
constexpr int kWindowStep = 1 << 19;

// One (row, vector) problem on the bound path: a bound lo reached by n_low to kCap block bounds
// (n_low = min(3 k, kCap - 24): the listed blocks then usually hold k scores >= lo; searched from
// `wguess`, the previous vector's lo, galloping by kWindowStep, then bisecting), steps 3-5 on the
// listed blocks. When the listed blocks show fewer than k scores >= lo, or no window is found,
// the problem runs solve_problem (the block maxima path) instead; `stats[1]` counts those.
template <typename T, int NC>
__device__ __forceinline__ void solve_problem_bounds(bool warm, int* stats, const RowSource<T, false>& src,
                                                     const float4* wpair, const float4* npair, const float* nrow,
                                                     const float* zrow, std::uint32_t* out_row, int n_blocks, int k,
                                                     int* list, int* scores, int lane, int& guess, int& wguess) {
  int ub[NC];
  block_bounds<NC>(wpair, npair, n_blocks, lane, ub);
  auto count_ub = [&](int t) { return warp_count(NC - count_below(ub, t)); };  // t >= 0 at every call
  int lmax = ub[0];
#pragma unroll
  for (int i = 1; i < NC; ++i) lmax = max(lmax, ub[i]);
  const int top = __reduce_max_sync(kFullMask, lmax);
  const int n_low = min(3 * k, kCap - 24);
  bool found = false;
  int lo = 0, n_listed = 0;
  if (top >= 0) {
    unsigned a = 0u, b = static_cast<unsigned>(top) + 1u;  // count(b) == 0; count(a) > kCap once a_high
    bool a_high = false;
    int t = wguess >= 0 ? min(wguess, top) : max(top - (8 << 23), 0);
    int step = wguess >= 0 ? kWindowStep : 0;  // gallop from the guess while the counts stay on one side
    int side = 0;
    for (;;) {
      const int c = count_ub(t);
      int dir;
      if (c > kCap) {
        a = static_cast<unsigned>(t);
        a_high = true;
        dir = 1;
      } else if (c >= n_low || t == 0) {
        found = true;
        lo = t;
        n_listed = c;
        break;
      } else {
        b = static_cast<unsigned>(t);
        dir = -1;
      }
      if (b - a <= 1u) {
        if (a_high) break;  // no window: many equal bounds
        t = 0;
        continue;
      }
      if (step != 0 && (side == 0 || side == dir)) {
        side = dir;
        const long long next = static_cast<long long>(t) + dir * static_cast<long long>(step);
        step = step < (1 << 29) ? step * 2 : step;
        if (next > static_cast<long long>(a) && next < static_cast<long long>(b)) {
          t = static_cast<int>(next);
          continue;
        }
      }
      step = 0;
      t = static_cast<int>(a + ((b - a) >> 1));
    }
  }
  if (found && n_listed >= k) {
    if (warm) wguess = lo;
    const int r = select_listed<T, NC, false, true>(src, ub, nrow, zrow, out_row, k, lo, 0, n_listed, list, scores,
                                                    lane, warm, guess);
    if (r == kSolved) return;
    if (r == kExact) {
      if (lane == 0 && stats) atomicAdd(stats, 1);
      exact_row<T, false>(src, nrow, zrow, out_row, n_blocks, k, lane);
      return;
    }
  }
  if (lane == 0 && stats) atomicAdd(stats + 1, 1);
  solve_problem<T, NC, false>(warm, stats, src, nrow, zrow, out_row, n_blocks, k, list, scores, lane, guess);
}

inline int element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// Chunks of 256 columns per row, rounded up to a compiled size.
inline int chunks_for(std::int64_t d_in) {
  const std::int64_t need = ceil_div(d_in, 256);
  for (int nc : {5, 10, 20, 32})
    if (need <= nc) return nc;
  return 0;
}

// What the warp and thread kernels both need of a layer: a weight dtype they load (f16, bf16, f32),
// 16-byte aligned rows of weights and norms, k at most one per 8-column block, an int vector index.
inline bool vector_kernel_args_ok(const MaskLayerArgs& a) {
  const auto aligned16 = [](std::uintptr_t p) { return p % 16 == 0; };
  return a.k <= a.d_in / 8 && a.dtype >= 0 && a.dtype <= static_cast<int>(DType::kFloat32) && aligned16(a.weight) &&
         aligned16(a.norms) && aligned16(a.null_norms) && a.S * a.T < (1LL << 31);
}

// Resident blocks per SM (cached); raises the dynamic shared memory limit once per kernel.
inline int blocks_per_sm(const void* kernel, int warps, int smem, int device) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, int>, int> cache;
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

}  // namespace
}  // namespace memloc::cuda
