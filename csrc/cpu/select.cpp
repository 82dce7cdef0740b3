// Wanda scores (eq. 2/4) and the memorized-weight selection of eq. 5-7, per row without a sort.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "common.h"
#include "cpu/float_bits.h"
#include "cpu/kernels.h"

namespace memloc {
namespace cpu {
namespace {

// The selection's prefilter views a row as chunks of kChunk columns, each split into kLanes
// lanes: lane l of chunk c holds columns c * kChunk + u * kLanes + l, u = 0 .. 3. Lane maxima are
// what a SIMD max over the row produces without any horizontal step.
constexpr int64_t kChunk = 32;
constexpr int64_t kLanes = 8;

// sqrtf of every entry, once per sumsq vector (IEEE sqrt, correctly rounded). A -0.0 input gives
// +0.0 here (sqrtf would give -0.0): the two compare equal, so no mask changes, and every
// non-NaN score then has a clear sign bit.
std::vector<float> sqrt_all(const float* x, int64_t n, int nt) {
  (void)nt;  // used by the OpenMP pragma only
  std::vector<float> out(static_cast<size_t>(n));
  MEMLOC_OMP(parallel for schedule(static) num_threads(nt) if (n > (1 << 16)))
  for (int64_t i = 0; i < n; ++i) out[i] = std::sqrt(x[i]) + 0.0f;
  return out;
}

// Non-NaN scores are >= +0.0 (see sqrt_all), so their bit patterns, read as int32, order like
// their values: maxima and thresholds are taken on these keys, because an integer max
// vectorizes where a float max (which must honour NaN and -0.0) does not.
inline int32_t key_of(float score) { return static_cast<int32_t>(float_to_bits(score)); }

// Four int32 keys: GCC/Clang generic vectors (SSE2 on x86-64, NEON on arm64, scalar code
// elsewhere), because the auto-vectorizer does not turn the lane maxima below into SIMD.
typedef int32_t I32x4 __attribute__((vector_size(16)));

inline I32x4 load4(const float* p) {
  I32x4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline I32x4 max4(I32x4 a, I32x4 b) {
  const I32x4 gt = a > b;
  return (a & gt) | (b & ~gt);
}

inline I32x4 min4(I32x4 a, I32x4 b) {
  const I32x4 lt = a < b;
  return (a & lt) | (b & ~lt);
}

// scores[j] = |w[j]| * norms[j] in float32, exactly as the reference rounds it, plus the key
// maxima of every lane and chunk; returns whether some score is NaN (a NaN weight, or inf * 0).
template <typename T>
MEMLOC_AVX2_CLONES bool row_scores(const typename T::storage* w, const float* norms, int64_t d_in, float* scores, int32_t* lane_max,
                int32_t* chunk_max) {
  for (int64_t j = 0; j < d_in; ++j) scores[j] = T::abs(w[j]) * norms[j];
  const int64_t full = d_in / kChunk;
  // A NaN key, as an int32, is > 0x7f800000 (positive NaN) or < 0 (negative NaN): track the max
  // and the min of all keys.
  const I32x4 zero = {0, 0, 0, 0};
  I32x4 hi = zero;
  I32x4 lo = zero;
  for (int64_t c = 0; c < full; ++c) {
    const float* p = scores + c * kChunk;
    I32x4 m0 = zero;
    I32x4 m1 = zero;
    for (int64_t u = 0; u < kChunk; u += kLanes) {
      const I32x4 a = load4(p + u);
      const I32x4 b = load4(p + u + 4);
      lo = min4(lo, min4(a, b));
      m0 = max4(m0, a);
      m1 = max4(m1, b);
    }
    std::memcpy(lane_max + c * kLanes, &m0, sizeof m0);
    std::memcpy(lane_max + c * kLanes + 4, &m1, sizeof m1);
    const I32x4 m = max4(m0, m1);
    hi = max4(hi, m);
    chunk_max[c] = std::max(std::max(m[0], m[1]), std::max(m[2], m[3]));
  }
  int32_t top = std::max(std::max(hi[0], hi[1]), std::max(hi[2], hi[3]));
  int32_t bottom = std::min(std::min(lo[0], lo[1]), std::min(lo[2], lo[3]));
  if (full * kChunk < d_in) {
    const int64_t j0 = full * kChunk;
    int32_t m[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = j0; j < d_in; ++j) {
      const int32_t x = key_of(scores[j]);
      bottom = std::min(bottom, x);
      m[(j - j0) % kLanes] = std::max(m[(j - j0) % kLanes], x);
    }
    int32_t cm = 0;
    for (int64_t l = 0; l < kLanes; ++l) {
      lane_max[full * kLanes + l] = m[l];
      cm = std::max(cm, m[l]);
    }
    chunk_max[full] = cm;
    top = std::max(top, cm);
  }
  return top > 0x7f800000 || bottom < 0;
}

// A threshold tau with at least k of keys[0:n] >= tau, at most the k-th largest key: the bottom
// of the bucket (top 16 bits of the key: exponent and 7 mantissa bits) holding the k-th largest.
// Two counting passes of 256 buckets; 1 <= k <= n, keys in [0, 0x7f800000].
int32_t kth_lower_bound(const int32_t* keys, int64_t n, int64_t k) {
  int32_t count[256];
  std::fill(count, count + 256, 0);
  int32_t top = 0;
  for (int64_t i = 0; i < n; ++i) {
    ++count[keys[i] >> 23];
    top = std::max(top, keys[i] >> 23);
  }
  int64_t above = 0;
  for (; top > 0 && above + count[top] < k; --top) above += count[top];
  std::fill(count, count + 256, 0);
  int32_t next = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t bucket = (keys[i] >> 15) & 0xff;
    const bool in_top = (keys[i] >> 23) == top;
    count[bucket] += in_top;
    next = in_top ? std::max(next, bucket) : next;
  }
  for (; next > 0 && above + count[next] < k; --next) above += count[next];
  return (top << 23) | (next << 15);
}

// The k best columns of one NaN-free row by (score descending, column ascending), the tie rule.
// tau is a threshold reached by at least k chunk maxima: those k chunks each hold a score >= tau,
// so at least k scores are >= tau and every other score is < tau. The top k of the candidates
// (scores >= tau: little more than k for random data, found through the lane maxima) are then
// the top k of the row. Needs at least k chunks. The candidate lists are built without
// branches (write, then advance by the comparison): the comparisons are unpredictable.
class TopK {
 public:
  // Scratch for rows of up to max_d_in columns.
  explicit TopK(int64_t max_d_in)
      : chunk_idx_(static_cast<size_t>((max_d_in + kChunk - 1) / kChunk)),
        lane_idx_(chunk_idx_.size() * kLanes),
        cols_(static_cast<size_t>(max_d_in)),
        keys_(static_cast<size_t>(max_d_in)),
        tmp_(static_cast<size_t>(max_d_in)),
        ties_(static_cast<size_t>(max_d_in)) {}

  static bool fast_path_ok(int64_t d_in, int64_t k) { return (d_in + kChunk - 1) / kChunk >= k; }

  // Fills cols[0:k] (unordered) with the selected columns.
  void select(const float* scores, const int32_t* lane_max, const int32_t* chunk_max, int64_t d_in, int64_t k,
              int32_t* cols) {
    k_ = k;
    const int64_t chunks = (d_in + kChunk - 1) / kChunk;
    const int32_t tau = kth_lower_bound(chunk_max, chunks, k_);
    int64_t n_chunks = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      chunk_idx_[n_chunks] = static_cast<int32_t>(c);
      n_chunks += chunk_max[c] >= tau;
    }
    int64_t n_lanes = 0;
    for (int64_t i = 0; i < n_chunks; ++i) {
      const int64_t c = chunk_idx_[i];
      for (int64_t l = 0; l < kLanes; ++l) {
        lane_idx_[n_lanes] = static_cast<int32_t>(c * kLanes + l);
        n_lanes += lane_max[c * kLanes + l] >= tau;
      }
    }
    int64_t n = 0;
    for (int64_t i = 0; i < n_lanes; ++i) {
      const int64_t c = lane_idx_[i] / kLanes;
      const int64_t end = std::min(d_in, (c + 1) * kChunk);
      for (int64_t j = c * kChunk + lane_idx_[i] % kLanes; j < end; j += kLanes) {
        const int32_t x = key_of(scores[j]);
        keys_[n] = x;
        cols_[n] = static_cast<int32_t>(j);
        n += x >= tau;
      }
    }
    // v = the k-th largest key: every key above it is taken, then the lowest columns among its ties.
    const int32_t v = kth_largest(keys_.data(), n);
    int64_t taken = 0;
    int64_t n_ties = 0;
    for (int64_t i = 0; i < n; ++i) {
      cols[taken] = cols_[i];
      taken += keys_[i] > v;
      ties_[n_ties] = cols_[i];
      n_ties += keys_[i] == v;
    }
    const int64_t need = k_ - taken;
    if (n_ties > need) std::nth_element(ties_.begin(), ties_.begin() + (need - 1), ties_.begin() + n_ties);
    std::copy(ties_.begin(), ties_.begin() + need, cols + taken);
  }

 private:
  // The k-th largest of keys[0:n], n >= k. Usually n - k is small (a few percent of k): then
  // the n - k + 1 smallest keys are kept in a short sorted list, whose last entry is the answer.
  int32_t kth_largest(const int32_t* keys, int64_t n) {
    const int64_t m = n - k_ + 1;
    if (m > kShortList) {
      std::copy(keys, keys + n, tmp_.begin());
      std::nth_element(tmp_.begin(), tmp_.begin() + (k_ - 1), tmp_.begin() + n, std::greater<int32_t>());
      return tmp_[k_ - 1];
    }
    int32_t low[kShortList];
    int64_t size = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t x = keys[i];
      if (size == m && x >= low[m - 1]) continue;
      int64_t pos = size < m ? size++ : m - 1;
      for (; pos > 0 && low[pos - 1] > x; --pos) low[pos] = low[pos - 1];
      low[pos] = x;
    }
    return low[m - 1];
  }

  static constexpr int64_t kShortList = 32;
  int64_t k_ = 1;
  std::vector<int32_t> chunk_idx_, lane_idx_, cols_, keys_, tmp_, ties_;
};

// The exact selection for any k (used when the row has fewer than k blocks): a full ordering of
// (score descending, column ascending) up to position k.
void select_small_rows(const float* scores, int64_t d_in, int64_t k, std::vector<int32_t>& order, int32_t* cols) {
  order.resize(static_cast<size_t>(d_in));
  for (int64_t j = 0; j < d_in; ++j) order[j] = static_cast<int32_t>(j);
  if (k < d_in) {
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), [scores](int32_t a, int32_t b) {
      return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
    });
  }
  std::copy(order.begin(), order.begin() + k, cols);
}

// The reference's selection when the row holds NaN scores. torch.topk ranks NaN above every
// number, so with n NaNs the k-th value is the (k - n)-th largest number v (or NaN when n >= k,
// selecting nothing); then every number > v is taken, and numbers == v from the left until k are
// taken. NaN entries themselves never pass (NaN > x is false). Returns the number selected.
int64_t select_with_nans(const float* scores, int64_t d_in, int64_t k, std::vector<float>& tmp, int32_t* cols) {
  tmp.clear();
  for (int64_t j = 0; j < d_in; ++j)
    if (scores[j] == scores[j]) tmp.push_back(scores[j]);
  const int64_t nans = d_in - static_cast<int64_t>(tmp.size());
  if (nans >= k) return 0;
  const int64_t rank = k - nans;  // 1-based rank of v among the numbers
  std::nth_element(tmp.begin(), tmp.begin() + (rank - 1), tmp.end(), std::greater<float>());
  const float v = tmp[rank - 1];
  int64_t above = 0;
  for (int64_t j = 0; j < d_in; ++j) above += scores[j] > v;
  int64_t equal_left = k - above;
  int64_t n = 0;
  for (int64_t j = 0; j < d_in; ++j) {
    if (scores[j] > v || (scores[j] == v && equal_left-- > 0)) cols[n++] = static_cast<int32_t>(j);
  }
  return n;
}

// One layer of a memorized_mask(_multi) call, with its norms computed once.
struct Layer {
  MaskLayer args;
  std::vector<float> norms, null_norms;
};

// Per-thread buffers for rows of up to max_d_in columns.
struct RowScratch {
  explicit RowScratch(int64_t max_d_in, int64_t max_k)
      : scores(static_cast<size_t>(max_d_in)),
        lane_max(static_cast<size_t>((max_d_in + kChunk - 1) / kChunk * kLanes)),
        chunk_max(static_cast<size_t>((max_d_in + kChunk - 1) / kChunk)),
        cols(static_cast<size_t>(max_k)),
        topk(max_d_in) {}
  std::vector<float> scores;
  std::vector<int32_t> lane_max, chunk_max;
  std::vector<float> tmp;
  std::vector<int32_t> order, cols;
  TopK topk;
};

// Rows [row0, row1) of one layer: for each (s, t), the row's top k (eq. 5) AND score > null score
// (eq. 6), OR-ed into out[s] (eq. 7's union over t).
template <typename T>
void mask_rows(const Layer& layer, int64_t row0, int64_t row1, RowScratch& scratch) {
  const MaskLayer& a = layer.args;
  const auto* weight = static_cast<const typename T::storage*>(a.weight);
  const int64_t d_in = a.d_in;
  const int64_t k = a.k;
  const int64_t words = n_words(d_in);
  const bool fast = TopK::fast_path_ok(d_in, k);
  float* scores = scratch.scores.data();
  int32_t* cols = scratch.cols.data();
  for (int64_t row = row0; row < row1; ++row) {
    const typename T::storage* w = weight + row * d_in;
    for (int64_t s = 0; s < a.S; ++s) {
      uint32_t* out_row = a.out + (s * a.d_out + row) * words;
      for (int64_t t = 0; t < a.T; ++t) {
        const int64_t st = (s * a.T + t) * d_in;
        const bool has_nan =
            row_scores<T>(w, layer.norms.data() + st, d_in, scores, scratch.lane_max.data(), scratch.chunk_max.data());
        int64_t n = k;
        if (has_nan) {
          n = select_with_nans(scores, d_in, k, scratch.tmp, cols);
        } else if (fast) {
          scratch.topk.select(scores, scratch.lane_max.data(), scratch.chunk_max.data(), d_in, k, cols);
        } else {
          select_small_rows(scores, d_in, k, scratch.order, cols);
        }
        // Eq. 6 only for the k candidates: the null score of the other columns never matters.
        const float* null_row = layer.null_norms.data() + st;
        for (int64_t i = 0; i < n; ++i) {
          const int32_t j = cols[i];
          if (scores[j] > T::abs(w[j]) * null_row[j]) out_row[j >> 5] |= 1u << (j & 31);
        }
      }
    }
  }
}

// Rows per task: enough work to amortize the scheduling, small enough to balance 2-16 threads.
constexpr int64_t kRowsPerTask = 16;

void check_layer(const MaskLayer& a) {
  if (a.d_in < 1 || a.k < 1 || a.k > a.d_in) {
    throw std::invalid_argument("memorized_mask: k = " + std::to_string(a.k) + " must be in [1, d_in = " +
                                std::to_string(a.d_in) + "]");
  }
  if (a.dtype != kFloat16 && a.dtype != kBFloat16 && a.dtype != kFloat32) bad_dtype("memorized_mask weight", a.dtype);
}

template <typename T>
void wanda_impl(const typename T::storage* weight, int64_t d_out, int64_t d_in, const float* sumsq, int64_t S,
                float* out, int threads) {
  std::vector<float> norms(static_cast<size_t>(S * d_in));
  for (int64_t i = 0; i < S * d_in; ++i) norms[i] = std::sqrt(sumsq[i]);
  MEMLOC_OMP(parallel for schedule(static) num_threads(resolve_threads(threads)))
  for (int64_t sr = 0; sr < S * d_out; ++sr) {
    const int64_t s = sr / d_out;
    const typename T::storage* w = weight + (sr % d_out) * d_in;
    const float* nrm = norms.data() + s * d_in;
    float* o = out + sr * d_in;
    for (int64_t j = 0; j < d_in; ++j) o[j] = T::abs(w[j]) * nrm[j];
  }
}

}  // namespace

void memorized_mask_multi(const MaskLayer* layers, int64_t n_layers, int threads) {
  const int nt = resolve_threads(threads);
  (void)nt;  // used by the OpenMP pragmas only
  std::vector<Layer> prepared;
  prepared.reserve(static_cast<size_t>(n_layers));
  int64_t max_d_in = 1;
  int64_t max_k = 1;
  // (layer, first row) of every task: all layers share one parallel region, so a thread wakes
  // once per call, not once per layer (costly when the cores are shared).
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (int64_t i = 0; i < n_layers; ++i) {
    const MaskLayer& a = layers[i];
    check_layer(a);
    if (a.d_out == 0 || a.S == 0 || a.T == 0) continue;
    const int64_t n = a.S * a.T * a.d_in;
    prepared.push_back({a, sqrt_all(a.sumsq, n, nt), sqrt_all(a.null_sumsq, n, nt)});
    max_d_in = std::max(max_d_in, a.d_in);
    max_k = std::max(max_k, a.k);
    for (int64_t r = 0; r < a.d_out; r += kRowsPerTask)
      tasks.emplace_back(static_cast<int64_t>(prepared.size()) - 1, r);
  }
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  MEMLOC_OMP(parallel num_threads(nt) if (n_tasks > 1))
  {
    RowScratch scratch(max_d_in, max_k);
    // Dynamic: tasks cost the same within a layer, but on a loaded machine a descheduled thread
    // would hold a static share hostage.
    MEMLOC_OMP(for schedule(dynamic, 1))
    for (int64_t i = 0; i < n_tasks; ++i) {
      const Layer& layer = prepared[tasks[i].first];
      const int64_t row0 = tasks[i].second;
      const int64_t row1 = std::min(layer.args.d_out, row0 + kRowsPerTask);
      switch (layer.args.dtype) {
        case kFloat16: mask_rows<Half>(layer, row0, row1, scratch); break;
        case kBFloat16: mask_rows<BFloat16>(layer, row0, row1, scratch); break;
        default: mask_rows<Float>(layer, row0, row1, scratch); break;
      }
    }
  }
}

void memorized_mask(const void* weight, int w_dtype, int64_t d_out, int64_t d_in, const float* sumsq,
                    const float* null_sumsq, int64_t S, int64_t T, int64_t k, uint32_t* out, int threads) {
  const MaskLayer layer{weight, w_dtype, d_out, d_in, sumsq, null_sumsq, S, T, k, out};
  memorized_mask_multi(&layer, 1, threads);
}

void wanda_scores(const void* weight, int w_dtype, int64_t d_out, int64_t d_in, const float* sumsq, int64_t S,
                  float* out, int threads) {
  switch (w_dtype) {
    case kFloat16: return wanda_impl<Half>(static_cast<const uint16_t*>(weight), d_out, d_in, sumsq, S, out, threads);
    case kBFloat16:
      return wanda_impl<BFloat16>(static_cast<const uint16_t*>(weight), d_out, d_in, sumsq, S, out, threads);
    case kFloat32: return wanda_impl<Float>(static_cast<const float*>(weight), d_out, d_in, sumsq, S, out, threads);
    default: bad_dtype("wanda_scores weight", w_dtype);
  }
}

}  // namespace cpu
}  // namespace memloc
