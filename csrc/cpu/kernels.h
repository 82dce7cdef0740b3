// The CPU kernels behind memloc_kernels._C: plain pointers and sizes, all buffers contiguous.
//
// Every function takes `threads`, the OpenMP team size (<= 0: the OpenMP default). Dtype codes are
// memloc::DType; packed masks are uint32 words, bit j % 32 of word j / 32 holding column j, with
// n_words(d_in) words per row. Errors are std::invalid_argument (ValueError in Python).
#pragma once

#include <cstdint>

namespace memloc {
namespace cpu {

// acc[g, j] += sum over rows r of group g of h[r, j]^2 for h [rows, d_in] (f16/bf16/f32/f64) and
// acc [rows / group_size, d_in] (f32/f64). Sums run in float64 over fixed row blocks reduced in a
// fixed order: the result does not depend on the thread count and needs no atomics.
void accumulate_sumsq(const void* h, int h_dtype, int64_t rows, int64_t d_in, void* acc, int acc_dtype,
                      int64_t group_size, int threads);

// h = hidden * gelu(gate) for proj_out [rows, 2 * d_ff] = [hidden | gate] (erf GELU, each step
// rounded to proj_out's dtype as diffusers computes it), written to h [rows, d_ff] of the same
// dtype; then accumulate_sumsq(h, acc, group_size).
void geglu_sumsq(const void* proj_out, int dtype, int64_t rows, int64_t d_ff, void* h, void* acc, int acc_dtype,
                 int64_t group_size, int threads);

// Eq. 2/4: out[s, i, j] = |float(W[i, j])| * sqrtf(sumsq[s, j]), W [d_out, d_in] f16/bf16/f32,
// sumsq [S, d_in] f32, out [S, d_out, d_in] f32.
void wanda_scores(const void* weight, int w_dtype, int64_t d_out, int64_t d_in, const float* sumsq, int64_t S,
                  float* out, int threads);

// Eq. 5-7: for each s, OR into out[s] (packed [S, d_out, n_words]) the union over t of the row
// top-k of score(sumsq[s, t]) (ties: lower column) AND score > score(null_sumsq[s, t]).
// sumsq and null_sumsq are [S, T, d_in] f32; 1 <= k <= d_in.
void memorized_mask(const void* weight, int w_dtype, int64_t d_out, int64_t d_in, const float* sumsq,
                    const float* null_sumsq, int64_t S, int64_t T, int64_t k, uint32_t* out, int threads);

// One layer of memorized_mask_multi: the arguments of memorized_mask.
struct MaskLayer {
  const void* weight;
  int dtype;
  int64_t d_out, d_in;
  const float* sumsq;
  const float* null_sumsq;
  int64_t S, T, k;
  uint32_t* out;
};

// memorized_mask for several layers in one parallel region (e.g. all FFNs of a UNet).
void memorized_mask_multi(const MaskLayer* layers, int64_t n_layers, int threads);

// bool (one byte, nonzero = set) [rows, d_in] <-> words [rows, n_words(d_in)]; padding bits zero.
void pack_mask(const uint8_t* mask, int64_t rows, int64_t d_in, uint32_t* words, int threads);
void unpack_mask(const uint32_t* words, int64_t rows, int64_t d_in, uint8_t* mask, int threads);

// Number of set bits of a [rows, d_in] packed mask, padding bits ignored.
int64_t mask_count(const uint32_t* words, int64_t rows, int64_t d_in, int threads);

// Zero the masked elements of weight [d_out, d_in] (elements of elem_size 2, 4 or 8 bytes, copied
// as raw bits) and store their old values in removed, row-major; n_removed must equal
// mask_count. restore writes them back.
void apply_mask(void* weight, int64_t elem_size, int64_t d_out, int64_t d_in, const uint32_t* words, void* removed,
                int64_t n_removed, int threads);
void restore(void* weight, int64_t elem_size, int64_t d_out, int64_t d_in, const uint32_t* words, const void* removed,
             int64_t n_removed, int threads);

// out[a] = popcount(words[a, :]) for words [n, w].
void mask_popcount(const uint32_t* words, int64_t n, int64_t w, int64_t* out, int threads);

// out[a, b] = popcount(words[a, :] & words[b, :]) for words [n, w], out [n, n].
void mask_intersections(const uint32_t* words, int64_t n, int64_t w, int64_t* out, int threads);

}  // namespace cpu
}  // namespace memloc
