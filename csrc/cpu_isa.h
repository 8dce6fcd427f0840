// Run-time choice of the CPU code path for the kernels that are compiled several times (portable
// C++, AVX2 + FMA, AVX-512F, AVX-512 BF16, AMX-BF16 tiles): the extension is built without -march
// and still runs anywhere. RMT_FAST_CPU_ISA=generic|avx2|avx512|avx512_bf16|amx caps the choice
// (read per call: tests switch it). Kernels without an AMX variant take their AVX-512 BF16 one on
// "amx"; kernels without an AVX2 variant take their portable one on "avx2".
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

// The paths compiled in: AVX-512 with GCC on x86-64; AVX-512 BF16 with GCC >= 10 (its first
// intrinsics) and AMX-BF16 with GCC >= 11, unless setup.py's toolchain probe found that the
// compiler or the assembler cannot build them (RMT_FAST_NO_AVX512_BF16, RMT_FAST_NO_AMX; e.g.
// GCC 11 with binutils < 2.36, which cannot assemble tile instructions).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RMT_CPU_X86 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#if __GNUC__ >= 10 && !defined(RMT_FAST_NO_AVX512_BF16)
#define RMT_CPU_BF16 1
#if __GNUC__ >= 11 && !defined(RMT_FAST_NO_AMX)
#define RMT_CPU_AMX 1
#endif
#endif
#endif

namespace rmt_fast {

// ordered: each path's instructions are a subset of the next one's CPUs (every AVX-512 CPU has
// AVX2 and FMA), so a cap is a minimum
enum CpuIsa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };
inline constexpr int kCpuIsas = 5;
inline const char* const kCpuIsaNames[kCpuIsas] = {"generic", "avx2", "avx512", "avx512_bf16",
                                                   "amx"};

// whether the CPU has AMX-BF16 tiles (CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE; Intel
// Sapphire Rapids and later)
inline bool cpu_has_amx_bf16() {
  static const bool amx = [] {
#ifdef RMT_CPU_X86
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) return ((d >> 22) & 1u) && ((d >> 24) & 1u);
#endif
    return false;
  }();
  return amx;
}

// whether this process may use the AMX tiles: the extension was compiled with them, the CPU has
// them and Linux granted the tile data state (arch_prctl(ARCH_REQ_XCOMP_PERM,
// XFEATURE_XTILEDATA), once per process; ATen/oneDNN ask the same way, a second request is a
// no-op)
inline bool amx_usable() {
  static const bool ok = [] {
#if defined(RMT_CPU_AMX) && defined(__linux__) && defined(SYS_arch_prctl)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return cpu_has_amx_bf16() &&
           syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}

// the best path compiled into this build
#if defined(RMT_CPU_AMX)
constexpr int kCompiledIsa = kAmx;
#elif defined(RMT_CPU_BF16)
constexpr int kCompiledIsa = kAvx512Bf16;
#elif defined(RMT_CPU_X86)
constexpr int kCompiledIsa = kAvx512;
#else
constexpr int kCompiledIsa = kGeneric;
#endif

// what this CPU supports (detected once), at most what this build has
inline int detected_cpu_isa() {
  static const int isa = [] {
#ifdef RMT_CPU_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      if (!__builtin_cpu_supports("avx512bf16")) return int(kAvx512);
      return std::min(amx_usable() ? int(kAmx) : int(kAvx512Bf16), kCompiledIsa);
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return int(kAvx2);
#endif
    return int(kGeneric);
  }();
  return isa;
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
  for (int i = 0; i < kCpuIsas; ++i)
    if (std::strcmp(env, kCpuIsaNames[i]) == 0) return std::min(i, isa);
  TORCH_CHECK(false, "RMT_FAST_CPU_ISA must be one of generic, avx2, avx512, avx512_bf16, amx, "
              "got '",
              env, "'");
}

}  // namespace rmt_fast
