// The portable code paths of the element-wise CPU kernels (layer_norm.cpp, cross_entropy.cpp,
// activations.cpp):
// portable_math.h compiled as namespace generic (any CPU) and, on x86 (RMT_CPU_X86, cpu_isa.h),
// as namespace avx2 (AVX2 + FMA: CPUs without AVX-512, where the baseline build ran LayerNorm at
// 0.5-0.6x and the cross-entropy at 0.2-0.9x ATen's AVX2 kernels on an AMD EPYC, 2026-12-07).
// Included once per .cpp, inside namespace rmt_fast; no include guard on purpose.
namespace generic {
#include "portable_math.h"
}  // namespace generic

#ifdef RMT_CPU_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "portable_math.h"
}  // namespace avx2
#pragma GCC pop_options
#endif
