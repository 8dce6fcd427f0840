// The AVX-512 code paths of the element-wise CPU kernels (activations.cpp, layer_norm.cpp):
// avx512_math.h compiled twice, as namespace avx512 (AVX-512F; RMT_CPU_ISA 1) and namespace
// avx512bf16 (with AVX-512 BF16's native rounding; RMT_CPU_ISA 2; only where RMT_CPU_BF16: the
// dispatchers never ask for it otherwise, cpu_isa.h). Included once per .cpp,
// inside namespace rmt_fast, on x86 (RMT_CPU_X86, cpu_isa.h); no include guard on purpose.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace avx512 {
#define RMT_CPU_ISA 1
#include "avx512_math.h"
#undef RMT_CPU_ISA
}  // namespace avx512
#pragma GCC pop_options

#ifdef RMT_CPU_BF16
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
namespace avx512bf16 {
#define RMT_CPU_ISA 2
#include "avx512_math.h"
#undef RMT_CPU_ISA
}  // namespace avx512bf16
#pragma GCC pop_options
#endif
