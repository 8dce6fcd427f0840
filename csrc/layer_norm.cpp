// rmt_fast::layer_norm: LayerNorm over the last dimension for float32 and bfloat16 CPU tensors,
// one row at a time in float32 (two passes over the row for mean and variance, then the affine
// output, rounded once for bf16). ATen's CPU kernel took 42 us for a bf16 [288, 256] activation
// on this project's AMD EPYC (2026-12-05), about 4% of a bf16 read at the default bench size
// (nine LayerNorms per segment); written by hand because no library call does it faster here.
// Code paths as the GELU kernel's (cpu_isa.h): AVX-512 BF16, AVX-512F, portable C++.
// Returns (y, mean, rstd), mean and rstd [..., 1] float32; the gradient is ATen's
// native_layer_norm_backward (registered from Python, with the statistics in x's dtype as ATen's
// own forward returns them).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "activation_math.h"
#include "cpu_isa.h"

namespace rmt_fast {

namespace {

template <typename T>
inline float load_f(const T* p, int64_t i) {
  if constexpr (sizeof(T) == 2) {
    return bf16_to_float(p[i]);
  } else {
    return p[i];
  }
}

template <typename T>
inline T store_f(float v) {
  if constexpr (sizeof(T) == 2) {
    return float_to_bf16(v);
  } else {
    return v;
  }
}

// one row: y = (x - mean) * rstd * w + b (w, b may be null); returns (mean, rstd)
template <typename T>
void layer_norm_row(const T* x, const T* w, const T* b, T* y, int64_t n, float eps,
                    float* mean_out, float* rstd_out, float* /*xf*/) {
  // double sums: one running float sum over a long row loses the digits ATen keeps (the
  // AVX-512 paths sum in 16 lanes)
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += load_f(x, i);
  const float mean = static_cast<float>(sum / static_cast<double>(n));
  double sq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(load_f(x, i)) - mean;
    sq += d * d;
  }
  const float rstd = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(n) + eps));
  for (int64_t i = 0; i < n; ++i) {
    float v = (load_f(x, i) - mean) * rstd;
    if (w != nullptr) v *= load_f(w, i);
    if (b != nullptr) v += load_f(b, i);
    y[i] = store_f<T>(v);
  }
  *mean_out = mean;
  *rstd_out = rstd;
}

}  // namespace

#ifdef RMT_CPU_X86
// The row is converted to float32 once, into xf (L1), and read from there by the later passes.
#define RMT_LN_AVX512_BODY                                                                     \
  inline __m512 ld(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }        \
  inline __m512 ld(const uint16_t* p, __mmask16 m) { return load_bf16x16(p, m); }              \
  inline void st(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }          \
  inline void st(uint16_t* p, __mmask16 m, __m512 v) { store_bf16x16(p, m, v); }               \
  template <typename T>                                                                        \
  void layer_norm_row512(const T* x, const T* w, const T* b, T* y, int64_t n, float eps,       \
                         float* mean_out, float* rstd_out, float* xf) {                        \
    __m512 acc = _mm512_setzero_ps();                                                          \
    for (int64_t i = 0; i < n; i += 16) {                                                      \
      const __m512 v = ld(x + i, head_mask16(n - i));                                          \
      _mm512_store_ps(xf + i, v);                                                              \
      acc = _mm512_add_ps(acc, v);                                                             \
    }                                                                                          \
    const float mean = _mm512_reduce_add_ps(acc) / static_cast<float>(n);                      \
    const __m512 vm = _mm512_set1_ps(mean);                                                    \
    acc = _mm512_setzero_ps();                                                                 \
    for (int64_t i = 0; i < n; i += 16) {                                                      \
      const __m512 d = _mm512_maskz_sub_ps(head_mask16(n - i), _mm512_load_ps(xf + i), vm);    \
      acc = _mm512_fmadd_ps(d, d, acc);                                                        \
    }                                                                                          \
    const float rstd = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(n) + eps); \
    const __m512 vr = _mm512_set1_ps(rstd);                                                    \
    for (int64_t i = 0; i < n; i += 16) {                                                      \
      const __mmask16 m = head_mask16(n - i);                                                  \
      __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(xf + i), vm), vr);                 \
      if (w != nullptr) v = _mm512_mul_ps(v, ld(w + i, m));                                    \
      if (b != nullptr) v = _mm512_add_ps(v, ld(b + i, m));                                    \
      st(y + i, m, v);                                                                         \
    }                                                                                          \
    *mean_out = mean;                                                                          \
    *rstd_out = rstd;                                                                          \
  }

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace ln_avx512 {
#define RMT_CPU_ISA 1
#include "avx512_math.h"
#undef RMT_CPU_ISA
RMT_LN_AVX512_BODY
}  // namespace ln_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
namespace ln_avx512bf16 {
#define RMT_CPU_ISA 2
#include "avx512_math.h"
#undef RMT_CPU_ISA
RMT_LN_AVX512_BODY
}  // namespace ln_avx512bf16
#pragma GCC pop_options
#undef RMT_LN_AVX512_BODY
#endif

template <typename T>
using RowFn = void (*)(const T*, const T*, const T*, T*, int64_t, float, float*, float*,
                      float*);

template <typename T>
RowFn<T> layer_norm_row_for(int isa) {
#ifdef RMT_CPU_X86
  if (isa >= kAvx512Bf16) return &ln_avx512bf16::layer_norm_row512<T>;
  if (isa == kAvx512) return &ln_avx512::layer_norm_row512<T>;
#endif
  (void)isa;
  return &layer_norm_row<T>;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "rmt_fast::layer_norm: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "rmt_fast::layer_norm: x must be [..., N], N > 0, "
              "got ", x.sizes());
  const int64_t n = x.size(-1), rows = x.numel() / n;
  for (const auto* t : {&weight, &bias}) {
    if (t->has_value() && t->value().defined()) {
      TORCH_CHECK(t->value().dim() == 1 && t->value().size(0) == n &&
                      t->value().scalar_type() == x.scalar_type(),
                  "rmt_fast::layer_norm: weight and bias must be [", n, "] in x's dtype (",
                  x.scalar_type(), "), got ", t->value().sizes(), " ", t->value().scalar_type());
    }
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.has_value() && weight->defined() ? weight->contiguous() : at::Tensor();
  const at::Tensor bc = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty_like(xc);
  std::vector<int64_t> stat_shape(x.sizes().begin(), x.sizes().end());
  stat_shape.back() = 1;
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  float* pm = mean.mutable_data_ptr<float>();
  float* pr = rstd.mutable_data_ptr<float>();
  const float feps = static_cast<float>(eps);
  const int isa = active_cpu_isa();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* px = static_cast<const T*>(xc.const_data_ptr());
    const T* pw = wc.defined() ? static_cast<const T*>(wc.const_data_ptr()) : nullptr;
    const T* pb = bc.defined() ? static_cast<const T*>(bc.const_data_ptr()) : nullptr;
    T* py = static_cast<T*>(y.data_ptr());
    const RowFn<T> row = layer_norm_row_for<T>(isa);
    at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 14) / n), [&](int64_t r0, int64_t r1) {
      // one float32 copy of the row (rounded up to 16 lanes, 64-byte aligned)
      std::vector<float> buf(((n + 15) / 16) * 16 + 16);
      float* xf = reinterpret_cast<float*>(
          (reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~static_cast<uintptr_t>(63));
      for (int64_t r = r0; r < r1; ++r)
        row(px + r * n, pw, pb, py + r * n, n, feps, pm + r, pr + r, xf);
    });
  };
  if (x.scalar_type() == at::kBFloat16) {
    run(uint16_t{});
  } else {
    run(float{});
  }
  return {y, mean.view(stat_shape), rstd.view(stat_shape)};
}

}  // namespace rmt_fast

TORCH_LIBRARY_FRAGMENT(rmt_fast, m) {
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rmt_fast, CPU, m) { m.impl("layer_norm", &rmt_fast::layer_norm_cpu); }
