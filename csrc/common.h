// Shared definitions of the native module: dtype codes and OpenMP helpers.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(_OPENMP)
#include <omp.h>
#define MEMLOC_STR_(x) #x
// Without -fopenmp the pragmas vanish (no -Wunknown-pragmas noise) and every loop runs serially.
#define MEMLOC_OMP(...) _Pragma(MEMLOC_STR_(omp __VA_ARGS__))
#else
#define MEMLOC_OMP(...)
#endif

// Function multi-versioning for the hot loops: the build may not assume more than the x86-64
// baseline (SSE2, no POPCNT; no -march), so a loop marked with one of these gets a clone for the
// newer ISA, picked once at load time (GNU ifunc). The code itself stays portable C++.
#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 8))
#define MEMLOC_AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#define MEMLOC_POPCNT_CLONES __attribute__((target_clones("popcnt", "default")))
#else
#define MEMLOC_AVX2_CLONES
#define MEMLOC_POPCNT_CLONES
#endif

namespace memloc {

// Element types crossing the Python boundary; memloc_kernels/backends/cpu.py maps torch dtypes to
// these through the module attributes of the same names, never through literal numbers.
enum DType : int {
  kFloat16 = 0,
  kBFloat16 = 1,
  kFloat32 = 2,
  kFloat64 = 3,
};

inline const char* dtype_name(int dtype) {
  switch (dtype) {
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    case kFloat32: return "float32";
    case kFloat64: return "float64";
    default: return "unknown";
  }
}

[[noreturn]] inline void bad_dtype(const char* what, int dtype) {
  throw std::invalid_argument(std::string(what) + ": unsupported dtype code " + std::to_string(dtype));
}

// Threads for one parallel region: the caller's request (torch.get_num_threads() from Python), or
// the OpenMP default when it passes 0 or less.
inline int resolve_threads(int requested) {
#if defined(_OPENMP)
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

inline int64_t n_words(int64_t d_in) { return (d_in + 31) / 32; }

// Bits of the last packed word that hold real columns (the rest is padding and stays zero).
inline uint32_t last_word_mask(int64_t d_in) {
  const int64_t rem = d_in % 32;
  return rem == 0 ? 0xffffffffu : ((1u << rem) - 1u);
}

}  // namespace memloc
