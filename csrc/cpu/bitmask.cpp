// Packed-mask ops: pack/unpack, exact prune/restore, popcounts for density and pairwise IoU.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/kernels.h"

namespace memloc {
namespace cpu {
namespace {

// Words per block of mask_intersections: N masks' blocks (N * 16 KiB) stay in L2 while all pairs
// of them are intersected.
constexpr int64_t kPairBlock = 4096;

MEMLOC_POPCNT_CLONES int64_t popcount_words(const uint32_t* a, int64_t n) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += __builtin_popcount(a[i]);
  return count;
}

MEMLOC_POPCNT_CLONES int64_t popcount_and(const uint32_t* a, const uint32_t* b, int64_t n) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += __builtin_popcount(a[i] & b[i]);
  return count;
}

// Set bits of row r of a packed [rows, d_in] mask, padding ignored.
inline int64_t row_count(const uint32_t* row, int64_t words, uint32_t last_mask) {
  return popcount_words(row, words - 1) + __builtin_popcount(row[words - 1] & last_mask);
}

// Exclusive prefix sums of the per-row counts: where each row's removed values start.
std::vector<int64_t> row_offsets(const uint32_t* words, int64_t rows, int64_t d_in, int nt) {
  const int64_t nw = n_words(d_in);
  const uint32_t last = last_word_mask(d_in);
  std::vector<int64_t> offsets(static_cast<size_t>(rows + 1), 0);
  MEMLOC_OMP(parallel for schedule(static) num_threads(nt))
  for (int64_t r = 0; r < rows; ++r) offsets[r + 1] = row_count(words + r * nw, nw, last);
  for (int64_t r = 0; r < rows; ++r) offsets[r + 1] += offsets[r];
  return offsets;
}

// Visits the set columns of row r (padding ignored) in increasing order.
template <typename F>
inline void for_each_set(const uint32_t* row, int64_t nw, uint32_t last, F&& f) {
  for (int64_t w = 0; w < nw; ++w) {
    uint32_t bits = w == nw - 1 ? row[w] & last : row[w];
    while (bits) {
      f(w * 32 + __builtin_ctz(bits));
      bits &= bits - 1;
    }
  }
}

// E is an unsigned integer of the element's size: values move as raw bits (NaN payloads, -0.0).
template <typename E>
void apply_impl(E* weight, int64_t d_out, int64_t d_in, const uint32_t* words, E* removed, int nt) {
  const std::vector<int64_t> offsets = row_offsets(words, d_out, d_in, nt);
  const int64_t nw = n_words(d_in);
  const uint32_t last = last_word_mask(d_in);
  MEMLOC_OMP(parallel for schedule(static) num_threads(nt))
  for (int64_t r = 0; r < d_out; ++r) {
    E* w = weight + r * d_in;
    E* dst = removed + offsets[r];
    for_each_set(words + r * nw, nw, last, [&](int64_t j) {
      *dst++ = w[j];
      w[j] = 0;  // all-zero bits: +0.0 in every float format, as masked_fill_(mask, 0) writes
    });
  }
}

template <typename E>
void restore_impl(E* weight, int64_t d_out, int64_t d_in, const uint32_t* words, const E* removed, int nt) {
  const std::vector<int64_t> offsets = row_offsets(words, d_out, d_in, nt);
  const int64_t nw = n_words(d_in);
  const uint32_t last = last_word_mask(d_in);
  MEMLOC_OMP(parallel for schedule(static) num_threads(nt))
  for (int64_t r = 0; r < d_out; ++r) {
    E* w = weight + r * d_in;
    const E* src = removed + offsets[r];
    for_each_set(words + r * nw, nw, last, [&](int64_t j) { w[j] = *src++; });
  }
}

void check_removed(const char* op, const uint32_t* words, int64_t d_out, int64_t d_in, int64_t n_removed, int nt) {
  const int64_t expected = mask_count(words, d_out, d_in, nt);
  if (expected != n_removed) {
    throw std::invalid_argument(std::string(op) + ": removed has " + std::to_string(n_removed) +
                                " values but the mask has " + std::to_string(expected) + " set bits");
  }
}

}  // namespace

void pack_mask(const uint8_t* mask, int64_t rows, int64_t d_in, uint32_t* words, int threads) {
  const int64_t nw = n_words(d_in);
  MEMLOC_OMP(parallel for schedule(static) num_threads(resolve_threads(threads)))
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* m = mask + r * d_in;
    uint32_t* out = words + r * nw;
    for (int64_t w = 0; w < nw; ++w) {
      const int64_t j0 = w * 32;
      const int64_t n = std::min<int64_t>(32, d_in - j0);
      uint32_t bits = 0;
      for (int64_t b = 0; b < n; ++b) bits |= static_cast<uint32_t>(m[j0 + b] != 0) << b;
      out[w] = bits;
    }
  }
}

void unpack_mask(const uint32_t* words, int64_t rows, int64_t d_in, uint8_t* mask, int threads) {
  const int64_t nw = n_words(d_in);
  MEMLOC_OMP(parallel for schedule(static) num_threads(resolve_threads(threads)))
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t* in = words + r * nw;
    uint8_t* m = mask + r * d_in;
    for (int64_t j = 0; j < d_in; ++j) m[j] = static_cast<uint8_t>((in[j >> 5] >> (j & 31)) & 1u);
  }
}

int64_t mask_count(const uint32_t* words, int64_t rows, int64_t d_in, int threads) {
  if (rows == 0 || d_in == 0) return 0;
  const int64_t nw = n_words(d_in);
  const uint32_t last = last_word_mask(d_in);
  int64_t total = 0;
  MEMLOC_OMP(parallel for schedule(static) reduction(+ : total) num_threads(resolve_threads(threads)))
  for (int64_t r = 0; r < rows; ++r) total += row_count(words + r * nw, nw, last);
  return total;
}

void apply_mask(void* weight, int64_t elem_size, int64_t d_out, int64_t d_in, const uint32_t* words, void* removed,
                int64_t n_removed, int threads) {
  const int nt = resolve_threads(threads);
  if (d_out == 0 || d_in == 0) return;
  check_removed("apply_mask", words, d_out, d_in, n_removed, nt);
  switch (elem_size) {
    case 2:
      return apply_impl(static_cast<uint16_t*>(weight), d_out, d_in, words, static_cast<uint16_t*>(removed), nt);
    case 4:
      return apply_impl(static_cast<uint32_t*>(weight), d_out, d_in, words, static_cast<uint32_t*>(removed), nt);
    case 8:
      return apply_impl(static_cast<uint64_t*>(weight), d_out, d_in, words, static_cast<uint64_t*>(removed), nt);
    default: throw std::invalid_argument("apply_mask: element size must be 2, 4 or 8, got " + std::to_string(elem_size));
  }
}

void restore(void* weight, int64_t elem_size, int64_t d_out, int64_t d_in, const uint32_t* words, const void* removed,
             int64_t n_removed, int threads) {
  const int nt = resolve_threads(threads);
  if (d_out == 0 || d_in == 0) return;
  check_removed("restore", words, d_out, d_in, n_removed, nt);
  switch (elem_size) {
    case 2:
      return restore_impl(static_cast<uint16_t*>(weight), d_out, d_in, words, static_cast<const uint16_t*>(removed),
                          nt);
    case 4:
      return restore_impl(static_cast<uint32_t*>(weight), d_out, d_in, words, static_cast<const uint32_t*>(removed),
                          nt);
    case 8:
      return restore_impl(static_cast<uint64_t*>(weight), d_out, d_in, words, static_cast<const uint64_t*>(removed),
                          nt);
    default: throw std::invalid_argument("restore: element size must be 2, 4 or 8, got " + std::to_string(elem_size));
  }
}

void mask_popcount(const uint32_t* words, int64_t n, int64_t w, int64_t* out, int threads) {
  const int nt = resolve_threads(threads);
  if (n >= 4 * nt || w < kPairBlock) {
    MEMLOC_OMP(parallel for schedule(static) num_threads(nt))
    for (int64_t a = 0; a < n; ++a) out[a] = popcount_words(words + a * w, w);
    return;
  }
  // Few long masks: split each one into blocks so every thread has work.
  for (int64_t a = 0; a < n; ++a) {
    const uint32_t* row = words + a * w;
    const int64_t blocks = (w + kPairBlock - 1) / kPairBlock;
    int64_t total = 0;
    MEMLOC_OMP(parallel for schedule(static) reduction(+ : total) num_threads(nt))
    for (int64_t b = 0; b < blocks; ++b) {
      total += popcount_words(row + b * kPairBlock, std::min(kPairBlock, w - b * kPairBlock));
    }
    out[a] = total;
  }
}

void mask_intersections(const uint32_t* words, int64_t n, int64_t w, int64_t* out, int threads) {
  const int nt = resolve_threads(threads);
  std::fill(out, out + n * n, int64_t{0});
  if (n == 0 || w == 0) return;
  const int64_t blocks = (w + kPairBlock - 1) / kPairBlock;
  if (blocks < nt) {
    // Short masks: rows of the upper triangle are the parallel work.
    MEMLOC_OMP(parallel for schedule(dynamic, 1) num_threads(nt))
    for (int64_t a = 0; a < n; ++a) {
      for (int64_t c = a; c < n; ++c) out[a * n + c] = popcount_and(words + a * w, words + c * w, w);
    }
  } else {
    // Long masks: each thread counts the upper triangle over its blocks; integer sums, so merging
    // the threads' partials in any order gives the same result.
    MEMLOC_OMP(parallel num_threads(nt))
    {
      std::vector<int64_t> local(static_cast<size_t>(n * n), 0);
      MEMLOC_OMP(for schedule(dynamic, 1))
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t w0 = b * kPairBlock;
        const int64_t len = std::min(kPairBlock, w - w0);
        for (int64_t a = 0; a < n; ++a) {
          const uint32_t* wa = words + a * w + w0;
          for (int64_t c = a; c < n; ++c) local[a * n + c] += popcount_and(wa, words + c * w + w0, len);
        }
      }
      MEMLOC_OMP(critical(memloc_intersections))
      for (int64_t i = 0; i < n * n; ++i) out[i] += local[i];
    }
  }
  for (int64_t a = 0; a < n; ++a)
    for (int64_t c = 0; c < a; ++c) out[a * n + c] = out[c * n + a];
}

}  // namespace cpu
}  // namespace memloc
