// rmt_fast::layer_norm: LayerNorm over the trailing dimensions of float32 and bfloat16 CPU
// tensors, the same contract as aten::native_layer_norm (output, mean, rstd; mean and rstd
// shaped [*leading, 1, ...], in x's dtype unless x is bf16 with float32 parameters, then
// float32), so that ATen's native_layer_norm_backward takes its gradient (rmt_fast/_extension.py).
// ATen's CPU kernel took 200 us per [528, 768] bf16 call on an AMX Xeon (2026-12-06), about
// 0.5 ns an element against 35 us for a copy of the same tensor: 5% of a bf16 GPT-2-small read.
// Written by hand because no library kernel is faster: one row at a time, in L1, three passes
// (sum, centred sum of squares, output) in float32 arithmetic, bf16 rounded once. Four code
// paths picked at run time like the other CPU kernels (cpu_isa.h): AVX-512 BF16 (native
// rounding), AVX-512F, and portable loops that the compiler vectorises, built for AVX2 + FMA
// and for any CPU (portable_namespaces.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "activation_math.h"
#include "cpu_isa.h"

namespace rmt_fast {

#include "portable_namespaces.h"  // generic::, avx2::layer_norm_rows

#ifdef RMT_CPU_X86
#include "avx512_namespaces.h"  // avx512::, avx512bf16::layer_norm_rows512
#endif

template <typename T>
using RowsFn = void (*)(const T*, const float*, const float*, T*, float*, float*, int64_t,
                        int64_t, float);

template <typename T>
RowsFn<T> layer_norm_rows_for(int isa) {
#ifdef RMT_CPU_X86
#ifdef RMT_CPU_BF16
  if (isa >= kAvx512Bf16) return &avx512bf16::layer_norm_rows512<T>;
#endif
  if (isa == kAvx512) return &avx512::layer_norm_rows512<T>;
  if (isa == kAvx2) return &avx2::layer_norm_rows<T>;
#endif
  (void)isa;
  return &generic::layer_norm_rows<T>;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cpu(
    const at::Tensor& x, at::IntArrayRef normalized_shape, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16,
              "rmt_fast::layer_norm: x must be float32 or bfloat16, got ", dt);
  const int64_t k = int64_t(normalized_shape.size());
  TORCH_CHECK(k >= 1 && k <= x.dim() && x.sizes().slice(x.dim() - k).equals(normalized_shape),
              "rmt_fast::layer_norm: normalized_shape ", normalized_shape,
              " must be the trailing dimensions of x, whose shape is ", x.sizes());
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  c10::optional<at::ScalarType> param_dtype;
  for (const auto& [name, t, has] : {std::make_tuple("weight", &weight, has_w),
                                     std::make_tuple("bias", &bias, has_b)}) {
    if (!has) continue;
    const at::Tensor& p = **t;
    TORCH_CHECK(p.sizes().equals(normalized_shape), "rmt_fast::layer_norm: ", name,
                " must have shape normalized_shape ", normalized_shape, ", got ", p.sizes());
    TORCH_CHECK(p.scalar_type() == dt || p.scalar_type() == at::kFloat, "rmt_fast::layer_norm: ",
                name, " must be float32 or x's dtype ", dt, ", got ", p.scalar_type());
    TORCH_CHECK(!param_dtype || *param_dtype == p.scalar_type(),
                "rmt_fast::layer_norm: weight and bias must have one dtype, got ", *param_dtype,
                " and ", p.scalar_type());
    TORCH_CHECK(p.device() == x.device(), "rmt_fast::layer_norm: ", name,
                " must be on x's device ", x.device(), ", got ", p.device());
    param_dtype = p.scalar_type();
  }
  const int64_t n = c10::multiply_integers(normalized_shape);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  // parameters as n floats (ones / zeros where absent), statistics as float32 rows, converted
  // here: ATen conversions of these small tensors cost about 25 us a call (4 ops), a sixth of
  // the kernel at GPT-2 size
  std::vector<float> wf(n, 1.0f), bf(n, 0.0f), stats(2 * rows);
  for (const auto& [src, dst] : {std::make_pair(&weight, &wf), std::make_pair(&bias, &bf)}) {
    if (!src->has_value() || !(*src)->defined()) continue;
    const at::Tensor p = (*src)->contiguous();
    if (p.scalar_type() == at::kFloat) {
      std::copy(p.const_data_ptr<float>(), p.const_data_ptr<float>() + n, dst->begin());
    } else {
      const uint16_t* pp = static_cast<const uint16_t*>(p.const_data_ptr());
      for (int64_t i = 0; i < n; ++i) (*dst)[i] = bf16_to_float(pp[i]);
    }
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const float* pw = wf.data();
  const float* pb = bf.data();
  float* pm = stats.data();
  float* pr = stats.data() + rows;
  const int isa = active_cpu_isa();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(n, 1));
  if (rows > 0) {
    if (dt == at::kBFloat16) {
      const uint16_t* px = static_cast<const uint16_t*>(xc.const_data_ptr());
      uint16_t* py = static_cast<uint16_t*>(y.data_ptr());
      const auto fn = layer_norm_rows_for<uint16_t>(isa);
      at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
        fn(px + r0 * n, pw, pb, py + r0 * n, pm + r0, pr + r0, r1 - r0, n, float(eps));
      });
    } else {
      const float* px = xc.const_data_ptr<float>();
      float* py = y.mutable_data_ptr<float>();
      const auto fn = layer_norm_rows_for<float>(isa);
      at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
        fn(px + r0 * n, pw, pb, py + r0 * n, pm + r0, pr + r0, r1 - r0, n, float(eps));
      });
    }
  }
  // aten::native_layer_norm's statistics: [*leading, 1 (k times)], float32 where x is float32
  // or the parameters are (mixed precision), else x's dtype (its backward insists)
  std::vector<int64_t> stat_shape(x.sizes().begin(), x.sizes().end() - k);
  stat_shape.insert(stat_shape.end(), k, 1);
  const bool mixed = param_dtype && *param_dtype != dt;
  const at::ScalarType stat_dtype = mixed ? at::kFloat : dt;
  at::Tensor mean = at::empty(stat_shape, x.options().dtype(stat_dtype));
  at::Tensor rstd = at::empty(stat_shape, x.options().dtype(stat_dtype));
  if (stat_dtype == at::kFloat) {
    std::copy(pm, pm + rows, mean.mutable_data_ptr<float>());
    std::copy(pr, pr + rows, rstd.mutable_data_ptr<float>());
  } else {
    uint16_t* om = static_cast<uint16_t*>(mean.data_ptr());
    uint16_t* orr = static_cast<uint16_t*>(rstd.data_ptr());
    for (int64_t r = 0; r < rows; ++r) {
      om[r] = float_to_bf16(pm[r]);
      orr[r] = float_to_bf16(pr[r]);
    }
  }
  return {y.view(x.sizes()), mean, rstd};
}

}  // namespace rmt_fast

TORCH_LIBRARY_FRAGMENT(rmt_fast, m) {
  m.def("layer_norm(Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rmt_fast, CPU, m) { m.impl("layer_norm", &rmt_fast::layer_norm_cpu); }
