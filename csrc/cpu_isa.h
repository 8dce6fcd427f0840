// Run-time choice of the CPU code path for the kernels that are compiled several times (portable
// C++, AVX-512F, AVX-512 BF16): the extension is built without -march and still runs anywhere.
// RMT_FAST_CPU_ISA=generic|avx512|avx512_bf16 caps the choice (read per call: tests switch it).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RMT_CPU_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace rmt_fast {

enum CpuIsa : int { kGeneric = 0, kAvx512 = 1, kAvx512Bf16 = 2 };
inline const char* const kCpuIsaNames[] = {"generic", "avx512", "avx512_bf16"};

// what this CPU supports (detected once)
inline int detected_cpu_isa() {
  static const int isa = [] {
#ifdef RMT_CPU_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      return __builtin_cpu_supports("avx512bf16") ? int(kAvx512Bf16) : int(kAvx512);
    }
#endif
    return int(kGeneric);
  }();
  return isa;
}

// whether the CPU has AMX-BF16 tiles (CPUID leaf 7: EDX bit 22; Intel Sapphire Rapids and later)
inline bool cpu_has_amx_bf16() {
  static const bool amx = [] {
#ifdef RMT_CPU_X86
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) return ((d >> 22) & 1u) != 0;
#endif
    return false;
  }();
  return amx;
}

// RMT_FAST_CPU_ISA, or nullptr when it is unset or empty
inline const char* cpu_isa_env() {
  const char* env = std::getenv("RMT_FAST_CPU_ISA");
  return env != nullptr && *env != '\0' ? env : nullptr;
}

// the detected instruction set, capped by RMT_FAST_CPU_ISA
inline int active_cpu_isa() {
  const int isa = detected_cpu_isa();
  const char* env = cpu_isa_env();
  if (env == nullptr) return isa;
  for (int i = 0; i < 3; ++i)
    if (std::strcmp(env, kCpuIsaNames[i]) == 0) return std::min(i, isa);
  TORCH_CHECK(false, "RMT_FAST_CPU_ISA must be one of generic, avx512, avx512_bf16, got '", env,
              "'");
}

}  // namespace rmt_fast
