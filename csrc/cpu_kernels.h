// citer._cpu_kernels: the CPU decode path's kernels (AVX-512), bound in cpu_bindings.cpp.
#pragma once
#include <torch/extension.h>

bool supported();
int64_t linear_max_rows();
int64_t attention_max_rows();
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& scale,
                     const c10::optional<torch::Tensor>& bias);
torch::Tensor dequantize_int8(const torch::Tensor& q, const torch::Tensor& scale, at::ScalarType dtype);
torch::Tensor linear_int8_gemm(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                               const c10::optional<torch::Tensor>& bias);
torch::Tensor router_mlp(const torch::Tensor& h, const torch::Tensor& w1, const torch::Tensor& b1,
                         const torch::Tensor& w2, const torch::Tensor& b2,
                         const c10::optional<torch::Tensor>& norm_weight, double eps);
std::vector<torch::Tensor> rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                                    const c10::optional<torch::Tensor>& residual);
std::vector<torch::Tensor> rotary(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& cos,
                                  const torch::Tensor& sin);
void store_kvcache(const torch::Tensor& key, const torch::Tensor& value, const torch::Tensor& k_cache,
                   const torch::Tensor& v_cache, const torch::Tensor& slot_mapping);
std::vector<torch::Tensor> head_stats(const torch::Tensor& logits);
torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                              const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                              const torch::Tensor& query_start_loc, double scale);
