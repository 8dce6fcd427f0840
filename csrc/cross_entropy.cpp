// rmt_fast::cross_entropy: the summed cross-entropy of float32 or bfloat16 CPU logits [N, V]
// against int64 targets [N] (rows whose target is ignore_index count 0), float32 arithmetic,
// and the rows' log-sum-exp [N] float32 that rmt_fast::cross_entropy_backward takes to write
// the logits' gradient g (softmax(x) - onehot(target)) in one pass, in the logits' dtype.
// Through ATen the loss of a bf16 RMT training step (autocast) took a float32 copy of the
// logits, log_softmax, nll_loss, and in the backward a zero-filled float32 gradient, a scatter,
// log_softmax's backward and a cast back: about a tenth of the step on an AMX Xeon
// (2026-12-06; 1.9 ns an element for log_softmax alone). Written by hand: ATen offers no fused
// CPU cross-entropy. Four code paths picked at run time like the other CPU kernels
// (cpu_isa.h): AVX-512 BF16, AVX-512F, and portable loops built for AVX2 + FMA and for any CPU
// (portable_namespaces.h). Registered with its autograd formula
// from Python (rmt_fast/_extension.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "activation_math.h"
#include "cpu_isa.h"

namespace rmt_fast {

#include "portable_namespaces.h"  // generic::, avx2:: row_lse, row_softmax_grad

#ifdef RMT_CPU_X86
#include "avx512_namespaces.h"  // avx512::, avx512bf16:: row_lse512, row_softmax_grad512
#endif

namespace {

template <typename T>
struct CeRows {
  float (*lse)(const T*, int64_t);
  void (*grad)(const T*, float, float, T*, int64_t);
};

template <typename T>
CeRows<T> ce_rows_for(int isa) {
#ifdef RMT_CPU_X86
#ifdef RMT_CPU_BF16
  if (isa >= kAvx512Bf16) return {&avx512bf16::row_lse512<T>, &avx512bf16::row_softmax_grad512<T>};
#endif
  if (isa == kAvx512) return {&avx512::row_lse512<T>, &avx512::row_softmax_grad512<T>};
  if (isa == kAvx2) return {&avx2::row_lse<T>, &avx2::row_softmax_grad<T>};
#endif
  (void)isa;
  return {&generic::row_lse<T>, &generic::row_softmax_grad<T>};
}

// logits [N, V] float32/bf16 with V >= 1, targets [N] int64 each in [0, V) or ignore_index
void check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& targets,
                  int64_t ignore_index) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16, op,
              ": logits must be float32 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1, op,
              ": logits must be [N, V] with V >= 1, got shape ", logits.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ",
              targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), op,
              ": targets must be [N] = [", logits.size(0), "], got shape ", targets.sizes());
  TORCH_CHECK(targets.device() == logits.device(), op, ": targets must be on logits' device ",
              logits.device(), ", got ", targets.device());
  const at::Tensor tc = targets.contiguous();
  const int64_t* t = tc.const_data_ptr<int64_t>();
  const int64_t V = logits.size(1);
  for (int64_t r = 0; r < tc.numel(); ++r)
    TORCH_CHECK(t[r] == ignore_index || (t[r] >= 0 && t[r] < V), op, ": targets must be in [0, ",
                V, ") or ignore_index (", ignore_index, "), got ", t[r], " at row ", r);
}

template <typename T>
const T* data_of(const at::Tensor& x) {
  return static_cast<const T*>(x.const_data_ptr());
}

}  // namespace

// (loss: the sum over counted rows of lse - x[target], float32 scalar; lse [N] float32, 0 on
// ignored rows). The sum is taken in double in row order, so it does not depend on the threads.
std::tuple<at::Tensor, at::Tensor> cross_entropy_cpu(const at::Tensor& logits,
                                                     const at::Tensor& targets,
                                                     int64_t ignore_index) {
  check_inputs("rmt_fast::cross_entropy", logits, targets, ignore_index);
  const at::Tensor xc = logits.contiguous(), tc = targets.contiguous();
  const int64_t N = xc.size(0), V = xc.size(1);
  at::Tensor lse = at::zeros({N}, logits.options().dtype(at::kFloat));
  std::vector<float> row_loss(N, 0.0f);
  const int64_t* t = tc.const_data_ptr<int64_t>();
  float* pl = lse.mutable_data_ptr<float>();
  const int isa = active_cpu_isa();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / V);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* x = data_of<T>(xc);
    const auto fn = ce_rows_for<T>(isa).lse;
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (t[r] == ignore_index) continue;
        pl[r] = fn(x + r * V, V);
        row_loss[r] = pl[r] - to_float(x[r * V + t[r]]);
      }
    });
  };
  if (xc.scalar_type() == at::kBFloat16) {
    run(uint16_t{});
  } else {
    run(float{});
  }
  double total = 0.0;
  for (float l : row_loss) total += l;
  return {at::scalar_tensor(total, logits.options().dtype(at::kFloat)), lse};
}

// d loss / d logits = grad (softmax(x) - onehot(target)) on counted rows, 0 on ignored rows,
// in the logits' dtype
at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                      const at::Tensor& targets, const at::Tensor& lse,
                                      int64_t ignore_index) {
  check_inputs("rmt_fast::cross_entropy_backward", logits, targets, ignore_index);
  TORCH_CHECK(grad.numel() == 1, "rmt_fast::cross_entropy_backward: grad must be a scalar, got "
              "shape ", grad.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 1 && lse.size(0) == logits.size(0),
              "rmt_fast::cross_entropy_backward: lse must be float32 [N] = [", logits.size(0),
              "], got ", lse.scalar_type(), " ", lse.sizes());
  const at::Tensor xc = logits.contiguous(), tc = targets.contiguous(), lc = lse.contiguous();
  const int64_t N = xc.size(0), V = xc.size(1);
  at::Tensor dx = at::empty_like(xc);
  const float g = grad.item<float>();
  const int64_t* t = tc.const_data_ptr<int64_t>();
  const float* pl = lc.const_data_ptr<float>();
  const int isa = active_cpu_isa();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / V);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* x = data_of<T>(xc);
    T* d = static_cast<T*>(dx.data_ptr());
    const auto fn = ce_rows_for<T>(isa).grad;
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        T* dr = d + r * V;
        if (t[r] == ignore_index) {
          std::fill(dr, dr + V, from_float<T>(0.0f));
          continue;
        }
        fn(x + r * V, pl[r], g, dr, V);
        // the target's element: (p - 1) g, from p in float32 (not from the rounded dr)
        dr[t[r]] = from_float<T>((exp_approx(to_float(x[r * V + t[r]]) - pl[r]) - 1.0f) * g);
      }
    });
  };
  if (xc.scalar_type() == at::kBFloat16) {
    run(uint16_t{});
  } else {
    run(float{});
  }
  return dx;
}

}  // namespace rmt_fast

TORCH_LIBRARY_FRAGMENT(rmt_fast, m) {
  m.def("cross_entropy(Tensor logits, Tensor targets, int ignore_index) -> (Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor grad, Tensor logits, Tensor targets, Tensor lse, "
        "int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(rmt_fast, CPU, m) {
  m.impl("cross_entropy", &rmt_fast::cross_entropy_cpu);
  m.impl("cross_entropy_backward", &rmt_fast::cross_entropy_backward_cpu);
}
