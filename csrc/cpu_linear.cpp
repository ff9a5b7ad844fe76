// citer._cpu_linear: y = x @ w.T for the few rows of a decode step or a short catch-up, at
// the memory bandwidth of the CPU (torch's GEMV on these rows streams far below it, and
// its bfloat16 path for one row is slower than float32).
//
//   linear(x [M, K] float32 | bfloat16, w [N, K] float32 | bfloat16 | int8, scale [N] float32
//          (int8: per-output-channel), bias [N] or None) -> [M, N] in x's dtype
//
// Each weight row is read once per call and multiplied with all M rows of x (kept in L1/L2),
// so a call streams the weights exactly once: fp32 with FMA, bfloat16 with AVX512-BF16's
// vdpbf16ps (pairs of bf16 products summed in fp32), int8 widened to fp32 and scaled at the
// end. Output channels are split over torch's intra-op threads (at::parallel_for: the same
// OpenMP pool as every other op). Accumulation is in float32; outputs round to x's dtype.
// Compiled with AVX-512 (F, BW, VL, BF16); `supported()` says whether this CPU runs it
// (the Python side then uses it, else torch).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int64_t kRowsPerTile = 4;  // weight rows per inner step: 4 x M accumulators
constexpr int64_t kMaxM = 16;        // rows of x a call takes (more: torch's GEMM is the better path)

inline __m512 load_x_f32(const float* p, int64_t n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
}

inline __m512 bf16_to_f32(__m256i v) {  // 16 bf16 -> 16 fp32 (exact)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// acc[m][r] += sum_k x[m][k] * w[r][k] over k in [k0, k0 + n), n <= 16, weights as fp32
template <typename LoadW>
inline void fma_block(const float* const* xs, int64_t m, LoadW load_w, int64_t k0, int64_t n,
                      __m512 (&acc)[kMaxM][kRowsPerTile], int64_t rows) {
  __m512 wv[kRowsPerTile];
  for (int64_t r = 0; r < rows; ++r) wv[r] = load_w(r, k0, n);
  for (int64_t i = 0; i < m; ++i) {
    const __m512 xv = n == 16 ? _mm512_loadu_ps(xs[i] + k0) : load_x_f32(xs[i] + k0, n);
    for (int64_t r = 0; r < rows; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
  }
}

template <typename LoadW>
void gemv_rows(const float* const* xs, int64_t m, int64_t k, int64_t n0, int64_t n1, LoadW load_w,
               const float* scale, const float* bias, float* out, int64_t ldo) {
  for (int64_t n = n0; n < n1; n += kRowsPerTile) {
    const int64_t rows = std::min(kRowsPerTile, n1 - n);
    __m512 acc[kMaxM][kRowsPerTile];
    for (int64_t i = 0; i < m; ++i)
      for (int64_t r = 0; r < kRowsPerTile; ++r) acc[i][r] = _mm512_setzero_ps();
    auto load = [&](int64_t r, int64_t k0, int64_t len) { return load_w(n + r, k0, len); };
    int64_t k0 = 0;
    for (; k0 + 16 <= k; k0 += 16) fma_block(xs, m, load, k0, 16, acc, rows);
    if (k0 < k) fma_block(xs, m, load, k0, k - k0, acc, rows);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t r = 0; r < rows; ++r) {
        float v = _mm512_reduce_add_ps(acc[i][r]);
        if (scale) v *= scale[n + r];
        if (bias) v += bias[n + r];
        out[i * ldo + n + r] = v;
      }
  }
}

// bfloat16 weights with bfloat16 x: vdpbf16ps over 32 k at a time (pairs summed in fp32)
void gemv_bf16(const at::BFloat16* const* xs, int64_t m, int64_t k, const at::BFloat16* w, int64_t n0, int64_t n1,
               const float* bias, float* out, int64_t ldo) {
  for (int64_t n = n0; n < n1; n += kRowsPerTile) {
    const int64_t rows = std::min(kRowsPerTile, n1 - n);
    __m512 acc[kMaxM][kRowsPerTile];
    for (int64_t i = 0; i < m; ++i)
      for (int64_t r = 0; r < kRowsPerTile; ++r) acc[i][r] = _mm512_setzero_ps();
    int64_t k0 = 0;
    for (; k0 + 32 <= k; k0 += 32) {
      __m512bh wv[kRowsPerTile];
      for (int64_t r = 0; r < rows; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + (n + r) * k + k0);
      for (int64_t i = 0; i < m; ++i) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xs[i] + k0);
        for (int64_t r = 0; r < rows; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, wv[r]);
      }
    }
    if (k0 < k) {  // the tail: masked 16-bit loads, zeros past k
      const __mmask32 mask = static_cast<__mmask32>((k - k0) >= 32 ? 0xffffffffu : ((1u << (k - k0)) - 1u));
      __m512bh wv[kRowsPerTile];
      for (int64_t r = 0; r < rows; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + (n + r) * k + k0);
      for (int64_t i = 0; i < m; ++i) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, xs[i] + k0);
        for (int64_t r = 0; r < rows; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, wv[r]);
      }
    }
    for (int64_t i = 0; i < m; ++i)
      for (int64_t r = 0; r < rows; ++r) {
        float v = _mm512_reduce_add_ps(acc[i][r]);
        if (bias) v += bias[n + r];
        out[i * ldo + n + r] = v;
      }
  }
}

int64_t grain(int64_t n) { return std::max<int64_t>(kRowsPerTile * 16, n / (4 * at::get_num_threads())); }

}  // namespace

bool supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& scale,
                     const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear: x [M, K], w [N, K] expected, got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.size(0) <= kMaxM, "linear: at most ", kMaxM, " rows, got ", x.size(0));
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "linear: contiguous x and w expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "linear: x float32 or bfloat16");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  auto out = torch::empty({m, n}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  torch::Tensor b32;
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    b32 = bias->to(at::kFloat).contiguous();
    b = b32.data_ptr<float>();
  }
  if (w.scalar_type() == at::kBFloat16) {
    auto xb = x.to(at::kBFloat16).contiguous();
    const at::BFloat16* xs[kMaxM];
    for (int64_t i = 0; i < m; ++i) xs[i] = xb.data_ptr<at::BFloat16>() + i * k;
    const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
    at::parallel_for(0, (n + kRowsPerTile - 1) / kRowsPerTile, grain(n) / kRowsPerTile, [&](int64_t t0, int64_t t1) {
      gemv_bf16(xs, m, k, wp, t0 * kRowsPerTile, std::min(n, t1 * kRowsPerTile), b, o, n);
    });
  } else {
    auto xf = x.to(at::kFloat).contiguous();
    const float* xs[kMaxM];
    for (int64_t i = 0; i < m; ++i) xs[i] = xf.data_ptr<float>() + i * k;
    if (w.scalar_type() == at::kFloat) {
      const float* wp = w.data_ptr<float>();
      auto load = [wp, k](int64_t row, int64_t k0, int64_t len) {
        return len == 16 ? _mm512_loadu_ps(wp + row * k + k0) : load_x_f32(wp + row * k + k0, len);
      };
      at::parallel_for(0, (n + kRowsPerTile - 1) / kRowsPerTile, grain(n) / kRowsPerTile, [&](int64_t t0, int64_t t1) {
        gemv_rows(xs, m, k, t0 * kRowsPerTile, std::min(n, t1 * kRowsPerTile), load, nullptr, b, o, n);
      });
    } else {
      TORCH_CHECK(w.scalar_type() == at::kChar && scale.has_value(), "linear: int8 weights need a scale [N]");
      auto s = scale->to(at::kFloat).contiguous();
      const float* sp = s.data_ptr<float>();
      const int8_t* wp = w.data_ptr<int8_t>();
      auto load = [wp, k](int64_t row, int64_t k0, int64_t len) {
        const __m128i q = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << len) - 1u), wp + row * k + k0);
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
      };
      at::parallel_for(0, (n + kRowsPerTile - 1) / kRowsPerTile, grain(n) / kRowsPerTile, [&](int64_t t0, int64_t t1) {
        gemv_rows(xs, m, k, t0 * kRowsPerTile, std::min(n, t1 * kRowsPerTile), load, sp, b, o, n);
      });
    }
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

PYBIND11_MODULE(_cpu_linear, m) {
  m.doc() = "Few-row linear layers at the CPU's memory bandwidth (fp32, bf16, int8 weights)";
  m.def("supported", &supported, "Does this CPU have AVX-512 F/BW/VL/BF16?");
  m.def("linear", &linear, "y = x @ w.T (* scale) (+ bias) for x of at most 16 rows", py::arg("x"), py::arg("w"),
        py::arg("scale") = py::none(), py::arg("bias") = py::none());
  m.attr("MAX_ROWS") = kMaxM;
}
