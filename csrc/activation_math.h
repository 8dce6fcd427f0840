// Per-element math of the activation kernels (plain C++, shared by every CPU code path).
#pragma once
#include <cstdint>

namespace rmt_fast {

// exp(x) for float, Cephes-style: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a polynomial,
// 2^n through the exponent bits. No branches or library calls, so that loops over it vectorise
// (with -fno-trapping-math, which lets the compiler turn the selects into blends). Inputs are
// clamped to [-87.34, 89]: below, 2^n would be subnormal; above 88.38 the result is +inf
// (n = 128 sets every exponent bit), as exp overflows there anyway (within 0.35 of the limit
// it returns inf instead of a value near FLT_MAX).
inline float exp_approx(float x) {
  x = x < -87.3365447505f ? -87.3365447505f : (x > 89.0f ? 89.0f : x);
  const float t = x * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(t + (t >= 0.0f ? 0.5f : -0.5f));  // round to nearest
  const float fn = static_cast<float>(n);
  x = x - fn * 0.693359375f + fn * 2.12194440e-4f;  // ln2 in two parts: exact n * ln2_hi
  const float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  union { int32_t i; float f; } pow2n;
  pow2n.i = (n + 127) << 23;
  return y * pow2n.f;
}

// GELU, tanh approximation: 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3), computed
// as x / (1 + exp(-2u)) (0.5 (1 + tanh(u)) = sigmoid(2u)), which stays accurate where
// tanh(u) -> -1 instead of cancelling.
inline float gelu_tanh(float x) {
  const float minus_2u = -1.5957691216057308f * x * (1.0f + 0.044715f * x * x);
  return x / (1.0f + exp_approx(minus_2u));
}

// d gelu_tanh / dx = s + x s (1 - s) 2 u', s = sigmoid(2u) = 1 / (1 + e), e = exp(-2u),
// u' = sqrt(2 / pi) (1 + 3 0.044715 x^2). 1 - s is taken as e s (no cancellation where s -> 1).
// x is clamped to [-10, 10] first (NaN stays NaN): beyond it the derivative is 1 or 0 to float
// precision (the second term is below 4e-36 at |x| = 10), and e, x^2 stay finite.
inline float gelu_tanh_grad(float x) {
  x = x < -10.0f ? -10.0f : (x > 10.0f ? 10.0f : x);
  const float x2 = x * x;
  const float e = exp_approx(-1.5957691216057308f * x * (1.0f + 0.044715f * x2));
  const float s = 1.0f / (1.0f + e);
  const float du2 = 1.5957691216057308f * (1.0f + 0.134145f * x2);  // 2 u'
  return s + x * s * (e * s) * du2;
}

// bfloat16 bits <-> float; float -> bf16 rounds to nearest even and keeps NaN a (quiet) NaN.
// Branch-free, so that loops over them vectorise.
inline float bf16_to_float(uint16_t b) {
  union { uint32_t i; float f; } u;
  u.i = static_cast<uint32_t>(b) << 16;
  return u.f;
}

inline uint16_t float_to_bf16(float f) {
  union { float f; uint32_t i; } u;
  u.f = f;
  const uint32_t rounded = (u.i + 0x7fffu + ((u.i >> 16) & 1u)) >> 16;
  return (u.i & 0x7fffffffu) > 0x7f800000u ? static_cast<uint16_t>(0x7fc0)
                                            : static_cast<uint16_t>(rounded);
}

// An element of a float32 (float) or bf16 (uint16_t bits) buffer as float, and back.
template <typename T>
inline float to_float(T x) {
  if constexpr (sizeof(T) == 2) {
    return bf16_to_float(x);
  } else {
    return x;
  }
}

template <typename T>
inline T from_float(float x) {
  if constexpr (sizeof(T) == 2) {
    return float_to_bf16(x);
  } else {
    return x;
  }
}

}  // namespace rmt_fast
