// rmt_fast::gelu_tanh: the tanh-approximation GELU (GPT-2's gelu_new) for float32 and bfloat16
// CPU tensors in one vectorised pass (bf16: float32 arithmetic, rounded to nearest even once).
// ATen's own CPU kernel for approximate="tanh" took 1.6 ms for a [288, 1024] activation on this
// project's CPU against 0.25 ms for the erf GELU, which made it about 14% of a GPT-2 RMT's
// inference time (and 7.8% of a bf16 GPT-2-small read once attention used the fused kernel).
// The gradient is ATen's gelu_backward (registered from Python, rmt_fast/_extension.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "activation_math.h"

namespace rmt_fast {

// one clone per instruction set, picked at load time (the extension is built without -march)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RMT_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RMT_ISA_CLONES
#endif

RMT_ISA_CLONES
void gelu_tanh_loop(const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = gelu_tanh(x[i]);
}

RMT_ISA_CLONES
void bf16_to_float_loop(const uint16_t* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_float(x[i]);
}

RMT_ISA_CLONES
void float_to_bf16_loop(const float* x, uint16_t* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16(x[i]);
}

// bf16 through the float32 loop in L1-sized chunks (one fused loop over bf16 vectorised 2-3x
// worse than this with GCC 12)
void gelu_tanh_bf16_loop(const uint16_t* x, uint16_t* y, int64_t n) {
  constexpr int64_t kChunk = 1024;
  alignas(64) float in[kChunk], out[kChunk];
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t m = std::min(kChunk, n - i);
    bf16_to_float_loop(x + i, in, m);
    gelu_tanh_loop(in, out, m);
    float_to_bf16_loop(out, y + i, m);
  }
}

at::Tensor gelu_tanh_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "rmt_fast::gelu_tanh: x must be float32 or bfloat16, got ", x.scalar_type());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  if (x.scalar_type() == at::kBFloat16) {
    const uint16_t* px = static_cast<const uint16_t*>(xc.const_data_ptr());
    uint16_t* py = static_cast<uint16_t*>(y.data_ptr());
    at::parallel_for(0, xc.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
      gelu_tanh_bf16_loop(px + begin, py + begin, end - begin);
    });
    return y;
  }
  const float* px = xc.const_data_ptr<float>();
  float* py = y.mutable_data_ptr<float>();
  at::parallel_for(0, xc.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    gelu_tanh_loop(px + begin, py + begin, end - begin);
  });
  return y;
}

}  // namespace rmt_fast

TORCH_LIBRARY_FRAGMENT(rmt_fast, m) { m.def("gelu_tanh(Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(rmt_fast, CPU, m) { m.impl("gelu_tanh", &rmt_fast::gelu_tanh_cpu); }
