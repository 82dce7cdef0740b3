// pybind11 bindings of the CUDA kernels: register_cuda_ops(m) adds the cuda_* functions to _C.
//
// Tensors arrive as device addresses (Python ints from Tensor.data_ptr()), sizes, dtype codes
// (memloc::cuda::DType) and the caller's stream (torch.cuda.current_stream().cuda_stream); see
// csrc/cuda/README.md. Argument errors raise ValueError, CUDA errors RuntimeError. The GIL is
// released while a call launches its kernels (launches are asynchronous).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/ops.h"

namespace py = pybind11;
using memloc::cuda::MaskLayerArgs;

namespace {

template <typename T>
void require_len(const std::vector<T>& v, std::size_t n, const char* name) {
  if (v.size() != n) {
    throw std::invalid_argument(std::string("cuda_memorized_mask_multi: ") + name + " has " +
                                std::to_string(v.size()) + " entries, expected " + std::to_string(n));
  }
}

}  // namespace

void register_cuda_ops(py::module_& m) {
  using std::int64_t;
  using std::uintptr_t;

  m.def(
      "cuda_memorized_mask",
      [](uintptr_t weight, int dtype, int64_t d_out, int64_t d_in, uintptr_t norms, uintptr_t null_norms, int64_t S,
         int64_t T, int64_t k, uintptr_t out, uintptr_t stream, int device) {
        MaskLayerArgs a;
        a.weight = weight, a.norms = norms, a.null_norms = null_norms, a.out = out, a.dtype = dtype;
        a.d_out = d_out, a.d_in = d_in, a.k = k, a.S = S, a.T = T;
        memloc::cuda::memorized_mask({a}, stream, device);
      },
      py::arg("weight"), py::arg("dtype"), py::arg("d_out"), py::arg("d_in"), py::arg("norms"), py::arg("null_norms"),
      py::arg("S"), py::arg("T"), py::arg("k"), py::arg("out"), py::arg("stream"), py::arg("device"),
      py::call_guard<py::gil_scoped_release>(),
      "OR into out [S, d_out, ceil(d_in/32)] int32 the union over T of (row top-k of |W| * norms, ties to the "
      "lower column) AND (score > |W| * null_norms); norms/null_norms are float32 [S, T, d_in] square roots.");

  m.def("cuda_pair_norm_maxima", &memloc::cuda::pair_norm_maxima, py::arg("norms"), py::arg("n_pairs"),
        py::arg("out"), py::arg("stream"), py::arg("device"), py::call_guard<py::gil_scoped_release>(),
        "out float32 [n_pairs] = max(|norms[2i]|, |norms[2i + 1]|), NaN where either is not finite.");

  m.def(
      "cuda_memorized_mask_multi",
      [](const std::vector<uintptr_t>& weights, const std::vector<int>& dtypes, const std::vector<int64_t>& d_outs,
         const std::vector<int64_t>& d_ins, const std::vector<uintptr_t>& norms,
         const std::vector<uintptr_t>& null_norms, const std::vector<int64_t>& Ss, const std::vector<int64_t>& Ts,
         const std::vector<int64_t>& ks, const std::vector<uintptr_t>& outs, uintptr_t stream, int device,
         uintptr_t stats, const std::vector<uintptr_t>& pair_norms) {
        const std::size_t n = weights.size();
        require_len(dtypes, n, "dtypes");
        require_len(d_outs, n, "d_outs");
        require_len(d_ins, n, "d_ins");
        require_len(norms, n, "norms");
        require_len(null_norms, n, "null_norms");
        require_len(Ss, n, "Ss");
        require_len(Ts, n, "Ts");
        require_len(ks, n, "ks");
        require_len(outs, n, "outs");
        if (!pair_norms.empty()) require_len(pair_norms, n, "pair_norms");
        std::vector<MaskLayerArgs> layers(n);
        for (std::size_t i = 0; i < n; ++i) {
          MaskLayerArgs& a = layers[i];
          a.weight = weights[i], a.norms = norms[i], a.null_norms = null_norms[i], a.out = outs[i];
          a.dtype = dtypes[i], a.d_out = d_outs[i], a.d_in = d_ins[i], a.k = ks[i], a.S = Ss[i], a.T = Ts[i];
          a.pair_norms = pair_norms.empty() ? 0 : pair_norms[i];
        }
        memloc::cuda::memorized_mask(layers, stream, device, stats);
      },
      py::arg("weights"), py::arg("dtypes"), py::arg("d_outs"), py::arg("d_ins"), py::arg("norms"),
      py::arg("null_norms"), py::arg("Ss"), py::arg("Ts"), py::arg("ks"), py::arg("outs"), py::arg("stream"),
      py::arg("device"), py::arg("stats") = 0, py::arg("pair_norms") = std::vector<uintptr_t>{},
      py::call_guard<py::gil_scoped_release>(),
      "cuda_memorized_mask for several layers; layers of one shape class share a launch. stats: 0 or the "
      "address of a device int32 [2] counting the problems decided by an exact path and those the warp "
      "kernel's bound path handed to its block-maxima path. pair_norms: empty, or per layer 0 or a float32 "
      "[S, T, d_in / 2] of the larger norm of each column pair (NaN where either is not finite), which "
      "batched calls of the warp kernel use for their bounds.");

  m.def("cuda_wanda_scores", &memloc::cuda::wanda_scores, py::arg("weight"), py::arg("dtype"), py::arg("d_out"),
        py::arg("d_in"), py::arg("norms"), py::arg("S"), py::arg("out"), py::arg("stream"), py::arg("device"),
        py::call_guard<py::gil_scoped_release>(),
        "out float32 [S, d_out, d_in] = |W| * norms[s]; norms float32 [S, d_in] square roots of sumsq.");

  m.def("cuda_memorized_mask_max_d_in", &memloc::cuda::memorized_mask_max_d_in,
        "Largest d_in that cuda_memorized_mask handles.");

  m.def("cuda_mask_popcount", &memloc::cuda::mask_popcount, py::arg("words"), py::arg("rows"), py::arg("n_words"),
        py::arg("d_in"), py::arg("out"), py::arg("stream"), py::arg("device"),
        py::call_guard<py::gil_scoped_release>(),
        "out int64 [rows] = set bits per row of words [rows, n_words]; d_in >= 0 ignores bits past d_in.");

  m.def("cuda_mask_intersections", &memloc::cuda::mask_intersections, py::arg("words"), py::arg("n"),
        py::arg("n_words"), py::arg("out"), py::arg("stream"), py::arg("device"),
        py::call_guard<py::gil_scoped_release>(), "out int64 [n, n] = popcount(words[a] & words[b]).");

  m.def("cuda_accumulate_sumsq_workspace_bytes", &memloc::cuda::accumulate_sumsq_workspace_bytes, py::arg("rows"),
        py::arg("d_in"), py::arg("group_size"), py::arg("acc_dtype"),
        "Scratch bytes cuda_accumulate_sumsq needs for these sizes.");

  m.def("cuda_accumulate_sumsq", &memloc::cuda::accumulate_sumsq, py::arg("h"), py::arg("h_dtype"), py::arg("rows"),
        py::arg("d_in"), py::arg("acc"), py::arg("acc_dtype"), py::arg("group_size"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"), py::arg("device"), py::call_guard<py::gil_scoped_release>(),
        "acc[g, j] += sum of h[row, j]^2 over the rows of group g; deterministic (fixed-order two-stage sum).");

  m.def("cuda_apply_mask", &memloc::cuda::apply_mask, py::arg("weight"), py::arg("dtype"), py::arg("d_out"),
        py::arg("d_in"), py::arg("words"), py::arg("offsets"), py::arg("removed"), py::arg("restore"),
        py::arg("stream"), py::arg("device"), py::call_guard<py::gil_scoped_release>(),
        "Zero (restore=False) or put back (restore=True) the masked weights; removed in row-major order.");

  m.def("cuda_pack_mask", &memloc::cuda::pack_mask, py::arg("mask"), py::arg("rows"), py::arg("d_in"),
        py::arg("words"), py::arg("stream"), py::arg("device"), py::call_guard<py::gil_scoped_release>(),
        "Pack bool [rows, d_in] into int32 words [rows, ceil(d_in/32)].");

  m.def("cuda_unpack_mask", &memloc::cuda::unpack_mask, py::arg("words"), py::arg("rows"), py::arg("d_in"),
        py::arg("mask"), py::arg("stream"), py::arg("device"), py::call_guard<py::gil_scoped_release>(),
        "Unpack int32 words [rows, ceil(d_in/32)] into bool [rows, d_in].");
}
