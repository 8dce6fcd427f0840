// rmt_fast::gelu_tanh: the tanh-approximation GELU (GPT-2's gelu_new) for float32 and bfloat16
// CPU tensors in one vectorised pass (bf16: float32 arithmetic, rounded to nearest even once).
// ATen's own CPU kernel for approximate="tanh" took 1.6 ms for a [288, 1024] activation on this
// project's CPU against 0.25 ms for the erf GELU, which made it about 14% of a GPT-2 RMT's
// inference time (and 7.8% of a bf16 GPT-2-small read once attention used the fused kernel).
// Four code paths, picked at run time like the attention kernel's (cpu_isa.h): AVX-512 BF16
// (native float -> bf16 rounding), AVX-512F (intrinsics), and portable loops that the compiler
// vectorises, built for AVX2 + FMA and for any CPU (portable_namespaces.h). The AVX-512 loops
// are written with intrinsics because GCC's vectorisation of the portable loop ran 3-5x slower
// than them (2026-12-04).
// rmt_fast::gelu_tanh_backward(grad, x): its gradient, the same four paths (ATen's bf16
// gelu_backward took 9% of a bf16 RMT training step on an AMX Xeon, 2026-12-06); registered as
// gelu_tanh's autograd formula from Python (rmt_fast/_extension.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "activation_math.h"
#include "cpu_isa.h"

namespace rmt_fast {

#include "portable_namespaces.h"  // generic::, avx2::gelu_tanh_loop, ...

#ifdef RMT_CPU_X86
#include "avx512_namespaces.h"  // avx512::, avx512bf16:: gelu_tanh_loop512, ...
#endif

// The loops of one code path: forward and gradient, float32 and bf16 (float32 needs no AVX-512
// BF16, so that path's float32 loops are the AVX-512F ones).
struct GeluLoops {
  void (*f32)(const float*, float*, int64_t);
  void (*bf16)(const uint16_t*, uint16_t*, int64_t);
  void (*f32_grad)(const float*, const float*, float*, int64_t);
  void (*bf16_grad)(const uint16_t*, const uint16_t*, uint16_t*, int64_t);
};

GeluLoops gelu_loops_for(int isa) {
#ifdef RMT_CPU_X86
#ifdef RMT_CPU_BF16
  if (isa >= kAvx512Bf16)
    return {&avx512::gelu_tanh_loop512<float>, &avx512bf16::gelu_tanh_loop512<uint16_t>,
            &avx512::gelu_tanh_backward_loop512<float>,
            &avx512bf16::gelu_tanh_backward_loop512<uint16_t>};
#endif
  if (isa == kAvx512)
    return {&avx512::gelu_tanh_loop512<float>, &avx512::gelu_tanh_loop512<uint16_t>,
            &avx512::gelu_tanh_backward_loop512<float>,
            &avx512::gelu_tanh_backward_loop512<uint16_t>};
  if (isa == kAvx2)
    return {&avx2::gelu_tanh_loop, &avx2::gelu_tanh_bf16_loop, &avx2::gelu_tanh_backward_loop,
            &avx2::gelu_tanh_backward_bf16_loop};
#endif
  (void)isa;
  return {&generic::gelu_tanh_loop, &generic::gelu_tanh_bf16_loop,
          &generic::gelu_tanh_backward_loop, &generic::gelu_tanh_backward_bf16_loop};
}

at::Tensor gelu_tanh_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "rmt_fast::gelu_tanh: x must be float32 or bfloat16, got ", x.scalar_type());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  if (x.scalar_type() == at::kBFloat16) {
    const uint16_t* px = static_cast<const uint16_t*>(xc.const_data_ptr());
    uint16_t* py = static_cast<uint16_t*>(y.data_ptr());
    const auto loop = gelu_loops_for(active_cpu_isa()).bf16;
    at::parallel_for(0, xc.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
      loop(px + begin, py + begin, end - begin);
    });
    return y;
  }
  const float* px = xc.const_data_ptr<float>();
  float* py = y.mutable_data_ptr<float>();
  const auto loop = gelu_loops_for(active_cpu_isa()).f32;
  at::parallel_for(0, xc.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    loop(px + begin, py + begin, end - begin);
  });
  return y;
}

// grad * gelu_tanh'(x), in x's dtype (float32 arithmetic; bf16 rounded once)
at::Tensor gelu_tanh_backward_cpu(const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "rmt_fast::gelu_tanh_backward: x must be float32 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "rmt_fast::gelu_tanh_backward: grad must "
              "have x's dtype ", x.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK(grad.sizes() == x.sizes(), "rmt_fast::gelu_tanh_backward: grad must have x's "
              "shape ", x.sizes(), ", got ", grad.sizes());
  const at::Tensor xc = x.contiguous(), gc = grad.contiguous();
  at::Tensor dx = at::empty_like(xc);
  if (x.scalar_type() == at::kBFloat16) {
    const uint16_t* px = static_cast<const uint16_t*>(xc.const_data_ptr());
    const uint16_t* pg = static_cast<const uint16_t*>(gc.const_data_ptr());
    uint16_t* pd = static_cast<uint16_t*>(dx.data_ptr());
    const auto loop = gelu_loops_for(active_cpu_isa()).bf16_grad;
    at::parallel_for(0, xc.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
      loop(pg + begin, px + begin, pd + begin, end - begin);
    });
    return dx;
  }
  const float* px = xc.const_data_ptr<float>();
  const float* pg = gc.const_data_ptr<float>();
  float* pd = dx.mutable_data_ptr<float>();
  const auto loop = gelu_loops_for(active_cpu_isa()).f32_grad;
  at::parallel_for(0, xc.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    loop(pg + begin, px + begin, pd + begin, end - begin);
  });
  return dx;
}

}  // namespace rmt_fast

TORCH_LIBRARY_FRAGMENT(rmt_fast, m) {
  m.def("gelu_tanh(Tensor x) -> Tensor");
  m.def("gelu_tanh_backward(Tensor grad, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(rmt_fast, CPU, m) {
  m.impl("gelu_tanh", &rmt_fast::gelu_tanh_cpu);
  m.impl("gelu_tanh_backward", &rmt_fast::gelu_tanh_backward_cpu);
}
