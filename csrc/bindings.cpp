// pybind11 module memloc_kernels._C: raw-pointer entry points of the CPU kernels (+ CUDA's).
//
// Tensors arrive as integer addresses (torch's data_ptr()), sizes and memloc::DType codes;
// memloc_kernels/backends/cpu.py allocates every output and guarantees contiguity and device.
// The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/kernels.h"

namespace py = pybind11;

#ifdef MEMLOC_WITH_CUDA
// Defined in csrc/cuda/bindings_cuda.cpp: adds the CUDA entry points to this module.
void register_cuda_ops(pybind11::module_& m);
#endif

namespace {

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

using Addresses = std::vector<std::uintptr_t>;
using Sizes = std::vector<int64_t>;

// memorized_mask_multi's layers from parallel lists (one entry per layer).
std::vector<memloc::cpu::MaskLayer> mask_layers(const Addresses& weights, const std::vector<int>& dtypes,
                                                const Sizes& d_outs, const Sizes& d_ins, const Addresses& sumsqs,
                                                const Addresses& null_sumsqs, const Sizes& Ss, const Sizes& Ts,
                                                const Sizes& ks, const Addresses& outs) {
  const size_t n = weights.size();
  for (size_t size : {dtypes.size(), d_outs.size(), d_ins.size(), sumsqs.size(), null_sumsqs.size(), Ss.size(),
                      Ts.size(), ks.size(), outs.size()}) {
    if (size != n) throw std::invalid_argument("memorized_mask_multi: all per-layer lists must have the same length");
  }
  std::vector<memloc::cpu::MaskLayer> layers(n);
  for (size_t i = 0; i < n; ++i) {
    layers[i] = {ptr<const void>(weights[i]), dtypes[i],    d_outs[i], d_ins[i], ptr<const float>(sumsqs[i]),
                 ptr<const float>(null_sumsqs[i]), Ss[i], Ts[i],    ks[i],     ptr<uint32_t>(outs[i])};
  }
  return layers;
}

py::dict build_info() {
  py::dict info;
#if defined(_OPENMP)
  info["openmp"] = true;
  info["openmp_version"] = static_cast<int>(_OPENMP);
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_version"] = 0;
  info["openmp_max_threads"] = 1;
#endif
#ifdef MEMLOC_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["compiler"] = compiler();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  using namespace memloc;
  namespace cpu = memloc::cpu;
  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.doc() = "memloc native kernels (pointer-based; call through memloc_kernels.ops, not directly)";
  m.attr("FLOAT16") = static_cast<int>(kFloat16);
  m.attr("BFLOAT16") = static_cast<int>(kBFloat16);
  m.attr("FLOAT32") = static_cast<int>(kFloat32);
  m.attr("FLOAT64") = static_cast<int>(kFloat64);
  m.def("build_info", &build_info, "Build flags: openmp, openmp_version, openmp_max_threads, cuda, compiler.");

  m.def(
      "accumulate_sumsq",
      [](std::uintptr_t h, int h_dtype, int64_t rows, int64_t d_in, std::uintptr_t acc, int acc_dtype,
         int64_t group_size, int threads) {
        cpu::accumulate_sumsq(ptr<const void>(h), h_dtype, rows, d_in, ptr<void>(acc), acc_dtype, group_size,
                              threads);
      },
      arg("h"), arg("h_dtype"), arg("rows"), arg("d_in"), arg("acc"), arg("acc_dtype"), arg("group_size"),
      arg("threads"), nogil);
  m.def(
      "geglu_sumsq",
      [](std::uintptr_t proj_out, int dtype, int64_t rows, int64_t d_ff, std::uintptr_t h, std::uintptr_t acc,
         int acc_dtype, int64_t group_size, int threads) {
        cpu::geglu_sumsq(ptr<const void>(proj_out), dtype, rows, d_ff, ptr<void>(h), ptr<void>(acc), acc_dtype,
                         group_size, threads);
      },
      arg("proj_out"), arg("dtype"), arg("rows"), arg("d_ff"), arg("h"), arg("acc"), arg("acc_dtype"),
      arg("group_size"), arg("threads"), nogil);
  m.def(
      "wanda_scores",
      [](std::uintptr_t weight, int w_dtype, int64_t d_out, int64_t d_in, std::uintptr_t sumsq, int64_t S,
         std::uintptr_t out, int threads) {
        cpu::wanda_scores(ptr<const void>(weight), w_dtype, d_out, d_in, ptr<const float>(sumsq), S, ptr<float>(out),
                          threads);
      },
      arg("weight"), arg("w_dtype"), arg("d_out"), arg("d_in"), arg("sumsq"), arg("S"), arg("out"), arg("threads"),
      nogil);
  m.def(
      "memorized_mask_multi",
      [](const Addresses& weights, const std::vector<int>& dtypes, const Sizes& d_outs, const Sizes& d_ins,
         const Addresses& sumsqs, const Addresses& null_sumsqs, const Sizes& Ss, const Sizes& Ts, const Sizes& ks,
         const Addresses& outs, int threads) {
        const auto layers = mask_layers(weights, dtypes, d_outs, d_ins, sumsqs, null_sumsqs, Ss, Ts, ks, outs);
        py::gil_scoped_release release;
        cpu::memorized_mask_multi(layers.data(), static_cast<int64_t>(layers.size()), threads);
      },
      arg("weights"), arg("dtypes"), arg("d_outs"), arg("d_ins"), arg("sumsqs"), arg("null_sumsqs"), arg("Ss"),
      arg("Ts"), arg("ks"), arg("outs"), arg("threads"));
  m.def(
      "pack_mask",
      [](std::uintptr_t mask, int64_t rows, int64_t d_in, std::uintptr_t words, int threads) {
        cpu::pack_mask(ptr<const uint8_t>(mask), rows, d_in, ptr<uint32_t>(words), threads);
      },
      arg("mask"), arg("rows"), arg("d_in"), arg("words"), arg("threads"), nogil);
  m.def(
      "unpack_mask",
      [](std::uintptr_t words, int64_t rows, int64_t d_in, std::uintptr_t mask, int threads) {
        cpu::unpack_mask(ptr<const uint32_t>(words), rows, d_in, ptr<uint8_t>(mask), threads);
      },
      arg("words"), arg("rows"), arg("d_in"), arg("mask"), arg("threads"), nogil);
  m.def(
      "mask_count",
      [](std::uintptr_t words, int64_t rows, int64_t d_in, int threads) {
        return cpu::mask_count(ptr<const uint32_t>(words), rows, d_in, threads);
      },
      arg("words"), arg("rows"), arg("d_in"), arg("threads"), nogil);
  m.def(
      "apply_mask",
      [](std::uintptr_t weight, int64_t elem_size, int64_t d_out, int64_t d_in, std::uintptr_t words,
         std::uintptr_t removed, int64_t n_removed, int threads) {
        cpu::apply_mask(ptr<void>(weight), elem_size, d_out, d_in, ptr<const uint32_t>(words), ptr<void>(removed),
                        n_removed, threads);
      },
      arg("weight"), arg("elem_size"), arg("d_out"), arg("d_in"), arg("words"), arg("removed"), arg("n_removed"),
      arg("threads"), nogil);
  m.def(
      "restore",
      [](std::uintptr_t weight, int64_t elem_size, int64_t d_out, int64_t d_in, std::uintptr_t words,
         std::uintptr_t removed, int64_t n_removed, int threads) {
        cpu::restore(ptr<void>(weight), elem_size, d_out, d_in, ptr<const uint32_t>(words), ptr<const void>(removed),
                     n_removed, threads);
      },
      arg("weight"), arg("elem_size"), arg("d_out"), arg("d_in"), arg("words"), arg("removed"), arg("n_removed"),
      arg("threads"), nogil);
  m.def(
      "mask_popcount",
      [](std::uintptr_t words, int64_t n, int64_t w, std::uintptr_t out, int threads) {
        cpu::mask_popcount(ptr<const uint32_t>(words), n, w, ptr<int64_t>(out), threads);
      },
      arg("words"), arg("n"), arg("w"), arg("out"), arg("threads"), nogil);
  m.def(
      "mask_intersections",
      [](std::uintptr_t words, int64_t n, int64_t w, std::uintptr_t out, int threads) {
        cpu::mask_intersections(ptr<const uint32_t>(words), n, w, ptr<int64_t>(out), threads);
      },
      arg("words"), arg("n"), arg("w"), arg("out"), arg("threads"), nogil);

#ifdef MEMLOC_WITH_CUDA
  register_cuda_ops(m);
#endif
}
