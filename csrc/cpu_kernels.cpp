// citer._cpu_kernels: the CPU decode path's kernels (AVX-512) and their Python bindings. One
// translation unit (cpu_linear.inc, cpu_router.inc, cpu_norm.inc, cpu_rotary.inc, cpu_kv_store.inc,
// cpu_head_stats.inc, cpu_attention.inc, cpu_layer.inc are its parts): parsing torch's headers is most of the build
// time, so they are parsed once.
#include "cpu_kernels.h"

#include "cpu_linear.inc"
#include "cpu_norm.inc"
#include "cpu_router.inc"
#include "cpu_rotary.inc"
#include "cpu_kv_store.inc"
#include "cpu_head_stats.inc"
#include "cpu_attention.inc"
#include "cpu_layer.inc"

PYBIND11_MODULE(_cpu_kernels, m) {
  m.doc() = "The CPU decode path's kernels: few-row linear layers, paged attention (AVX-512)";
  m.def("supported", &supported, "Does this CPU have AVX-512 F/BW/VL/BF16?");
  m.def("linear", &linear, "y = x @ w.T (* scale) (+ bias) for x of at most MAX_ROWS rows", py::arg("x"),
        py::arg("w"), py::arg("scale") = py::none(), py::arg("bias") = py::none());
  m.def("dequantize_int8", &dequantize_int8, "int8 weights [N, K] times their scales [N] in float32 or bfloat16",
        py::arg("q"), py::arg("scale"), py::arg("dtype"));
  m.def("linear_int8_gemm", &linear_int8_gemm, "y = x @ (q * scale).T (+ bias) for many rows of x (torch's GEMM)",
        py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("bias") = py::none());
  m.def("router_mlp", &router_mlp,
        "a hidden-only router's scores sigmoid(relu(h @ w1.T + b1) @ w2 + b2), h RMS-normed first with norm_weight",
        py::arg("h"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"), py::arg("norm_weight") = py::none(),
        py::arg("eps") = 0.0);
  m.def("rms_norm", &rms_norm, "RMSNorm of x (+ residual, fused) -> [out] or [out, residual_out]", py::arg("x"),
        py::arg("weight"), py::arg("eps"), py::arg("residual") = py::none());
  m.def("rotary", &rotary, "rotary embeddings of q and k -> [q_rot, k_rot]", py::arg("q"), py::arg("k"),
        py::arg("cos"), py::arg("sin"));
  m.def("store_kvcache", &store_kvcache, "the new tokens' keys and values into their cache slots", py::arg("key"),
        py::arg("value"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"));
  m.def("head_stats", &head_stats, "per row of float32 logits: [argmax, (top1, top2, sum e, sum e z)]",
        py::arg("logits"));
  m.def("paged_attention", &paged_attention, "decode / short catch-up attention from the block table",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_lens"),
        py::arg("query_start_loc"), py::arg("scale"));
  py::class_<CpuProjection>(m, "Projection",
                            "a linear layer's weights: w [N, K], scale [N] (int8 w), bias [N]; up to kernel_rows rows "
                            "of x on the few-row kernel, more on torch's GEMM")
      .def(py::init([](torch::Tensor w, c10::optional<torch::Tensor> scale, c10::optional<torch::Tensor> bias,
                       int64_t kernel_rows) {
             TORCH_CHECK(kernel_rows <= linear_max_rows(), "Projection: the kernel takes at most ", linear_max_rows(),
                         " rows");
             TORCH_CHECK(w.scalar_type() != at::kChar || scale.has_value(), "Projection: int8 weights need a scale");
             return CpuProjection{std::move(w), std::move(scale), std::move(bias), kernel_rows};
           }),
           py::arg("w"), py::arg("scale"), py::arg("bias"), py::arg("kernel_rows"));
  py::class_<CpuDecoderLayer>(m, "DecoderLayer", "one decoder layer of a decode step in one call (cpu_layer.inc)")
      .def(py::init<torch::Tensor, torch::Tensor, double, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>,
                    CpuProjection, CpuProjection, CpuProjection, CpuProjection, int64_t, int64_t, int64_t, int64_t,
                    double>(),
           py::arg("input_norm"), py::arg("post_norm"), py::arg("eps"), py::arg("q_norm"), py::arg("k_norm"),
           py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"), py::arg("num_heads"),
           py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("intermediate_size"), py::arg("scale"))
      .def("__call__", &CpuDecoderLayer::forward, py::arg("x"), py::arg("residual"), py::arg("cos"), py::arg("sin"),
           py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"), py::arg("block_tables"),
           py::arg("seq_lens"), py::arg("query_start_loc"));
  m.attr("MAX_ROWS") = linear_max_rows();
  m.attr("ATTENTION_MAX_ROWS") = attention_max_rows();
}
