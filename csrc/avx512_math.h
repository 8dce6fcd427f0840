// 16-lane versions of activation_math.h's element math, for the AVX-512 code paths. No include
// guard on purpose: it is included once per instruction-set namespace, inside a region compiled
// for that set (#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq[,avx512bf16]")), with
// RMT_CPU_ISA defined as 1 (AVX-512F) or 2 (AVX-512 BF16; native float -> bf16 rounding).

// exp(x) on 16 lanes (exp_approx's Cephes polynomial; 2^n by scalef), exactly 0 for x < -87
// (so -inf scores give 0), +inf above 88.7, NaN stays NaN
inline __m512 exp512(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);  // x if NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  const __m512 z = _mm512_mul_ps(r, r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, z, r), _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(y, n));
}

// exp(x) on 16 lanes for results rounded to bf16 next (bf16 GELU outputs, the attention's
// bf16 P): relative error at most 7e-6 (measured over [-87, 88]; bf16 rounding is up to 4e-3),
// 10 vector operations against exp512's 16, which took about a fifth of the bf16 attention
// forward and of the bf16 GELU on an AMX Xeon (2026-12-06). 2^(x log2 e) as 2^n 2^f with
// f in [-0.5, 0.5] and a degree-4 fit of 2^f (relative minimax). As exp512: exactly 0 for
// x < -87.3 (masked, not computed: an underflowing scalef takes a slow microcode assist), +inf
// above 88.73, NaN stays NaN.
inline __m512 exp512_bf16(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3365447505f), _CMP_NLT_UQ);
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);  // x if NaN
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 y = _mm512_set1_ps(9.570082649588585e-3f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.591784417629242e-2f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.40247443318367e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.931217908859253e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.999992847442627e-1f));
  return _mm512_maskz_scalef_ps(keep, y, n);
}

// exp512_bf16 where the result is rounded to bf16 next (kBf16Out), else exp512
template <bool kBf16Out>
inline __m512 exp512_for(__m512 x) {
  return kBf16Out ? exp512_bf16(x) : exp512(x);
}

// tanh(x) on 16 lanes as sign(x) (1 - e) / (1 + e), e = exp(-2 |x|) in (0, 1]: no overflow,
// absolute error a few float ulps (relative error grows as x -> 0, where 1 - e cancels). (A
// bf16-output form with exp512_bf16 and a reciprocal estimate instead of the division was no
// faster in the bf16 attention forward on an AMX Xeon, 2026-12-06.)
inline __m512 tanh512(__m512 x) {
  const __m512 sign = _mm512_set1_ps(-0.0f), one = _mm512_set1_ps(1.0f);
  const __m512 e = exp512(_mm512_mul_ps(_mm512_set1_ps(-2.0f), _mm512_andnot_ps(sign, x)));
  const __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
  return _mm512_or_ps(t, _mm512_and_ps(sign, x));
}

// gelu_tanh of activation_math.h on 16 lanes: x / (1 + exp(-2u)); kBf16Out: the result is
// rounded to bf16 next (exp512_for)
template <bool kBf16Out = false>
inline __m512 gelu_tanh512(__m512 x) {
  const __m512 cubic = _mm512_fmadd_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(0.044715f),
                                       _mm512_set1_ps(1.0f));
  const __m512 minus_2u = _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(-1.5957691216057308f)),
                                        cubic);
  const __m512 e = exp512_for<kBf16Out>(minus_2u);
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// gelu_tanh_grad of activation_math.h on 16 lanes (x clamped to [-10, 10], NaN kept: max/min
// return their second operand when one is NaN); kBf16Out: the result is rounded to bf16 next
// (exp512_for)
template <bool kBf16Out = false>
inline __m512 gelu_tanh_grad512(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(10.0f), _mm512_max_ps(_mm512_set1_ps(-10.0f), x));
  const __m512 x2 = _mm512_mul_ps(x, x);
  const __m512 cubic = _mm512_fmadd_ps(x2, _mm512_set1_ps(0.044715f), _mm512_set1_ps(1.0f));
  const __m512 minus_2u = _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(-1.5957691216057308f)),
                                        cubic);
  const __m512 e = exp512_for<kBf16Out>(minus_2u);
  const __m512 s = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  const __m512 du2 = _mm512_mul_ps(
      _mm512_set1_ps(1.5957691216057308f),
      _mm512_fmadd_ps(x2, _mm512_set1_ps(0.134145f), _mm512_set1_ps(1.0f)));
  const __m512 xsq = _mm512_mul_ps(_mm512_mul_ps(x, s), _mm512_mul_ps(e, s));
  return _mm512_fmadd_ps(xsq, du2, s);
}

// 16 bf16 values at p as floats
inline __m512 load_bf16x16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// the lanes of m of 16 bf16 values at p as floats (the other lanes 0, not read)
inline __m512 load_bf16x16(const uint16_t* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 floats rounded to bf16 (to nearest even, NaN a quiet NaN: float_to_bf16), lanes of m stored
inline void store_bf16x16(uint16_t* p, __mmask16 m, __m512 v) {
#if RMT_CPU_ISA >= 2
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
#else
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))),
                                16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
#endif
}

// mask of the first min(n, 16) lanes (none for n <= 0)
inline __mmask16 head_mask16(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : (n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u));
}

// 16 elements of a float32 (float) or bf16 (uint16_t bits) buffer as floats, lanes of m
// (the others 0, not read); store16 stores the lanes of m, bf16 rounded to nearest even
template <typename T>
inline __m512 load16(const T* p, __mmask16 m) {
  if constexpr (sizeof(T) == 2) {
    return load_bf16x16(reinterpret_cast<const uint16_t*>(p), m);
  } else {
    return _mm512_maskz_loadu_ps(m, p);
  }
}

template <typename T>
inline void store16(T* p, __mmask16 m, __m512 v) {
  if constexpr (sizeof(T) == 2) {
    store_bf16x16(reinterpret_cast<uint16_t*>(p), m, v);
  } else {
    _mm512_mask_storeu_ps(p, m, v);
  }
}

// y = gelu_tanh(x) over n float32 or bf16 elements (bf16: float32 arithmetic, rounded once)
template <typename T>
inline void gelu_tanh_loop512(const T* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = head_mask16(n - i);
    store16(y + i, m, gelu_tanh512<sizeof(T) == 2>(load16(x + i, m)));
  }
}

// dx = g * gelu_tanh'(x) over n float32 or bf16 elements (bf16: float32 arithmetic, rounded
// once)
template <typename T>
inline void gelu_tanh_backward_loop512(const T* g, const T* x, T* dx, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = head_mask16(n - i);
    store16(dx + i, m,
            _mm512_mul_ps(load16(g + i, m), gelu_tanh_grad512<sizeof(T) == 2>(load16(x + i, m))));
  }
}

// the sum of every lane of s[0..3]
inline float sum4(const __m512* s) {
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3])));
}

// LayerNorm rows of n elements (layer_norm.cpp): y = (x - mean) rstd w + b, mean[r] and rstd[r]
// float32; 64 elements a step in four accumulators (one add latency per 16 lanes bounded a
// two-accumulator loop), masked tails (any n)
template <typename T>
void layer_norm_rows512(const T* x, const float* w, const float* b, T* y, float* mean,
                        float* rstd, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    T* yr = y + r * n;
    __m512 s[4];
    for (int j = 0; j < 4; ++j) s[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 64)
      for (int j = 0; j < 4; ++j)
        s[j] = _mm512_add_ps(s[j], load16(xr + i + 16 * j, head_mask16(n - i - 16 * j)));
    const float mu = sum4(s) / float(n);
    const __m512 vmu = _mm512_set1_ps(mu);
    for (int j = 0; j < 4; ++j) s[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 64)
      for (int j = 0; j < 4; ++j) {
        const __mmask16 m = head_mask16(n - i - 16 * j);
        const __m512 d = _mm512_maskz_sub_ps(m, load16(xr + i + 16 * j, m), vmu);
        s[j] = _mm512_fmadd_ps(d, d, s[j]);
      }
    const float var = sum4(s) / float(n);
    const float rs = 1.0f / std::sqrt(var + eps);
    const __m512 vrs = _mm512_set1_ps(rs);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = head_mask16(n - i);
      const __m512 t = _mm512_mul_ps(_mm512_sub_ps(load16(xr + i, m), vmu), vrs);
      store16(yr + i, m, _mm512_fmadd_ps(t, _mm512_maskz_loadu_ps(m, w + i),
                                         _mm512_maskz_loadu_ps(m, b + i)));
    }
    mean[r] = mu;
    rstd[r] = rs;
  }
}

// Cross-entropy rows (cross_entropy.cpp), n >= 1 logits a row in float32 arithmetic: the row's
// log-sum-exp (NaN anywhere in the row gives NaN: exp512 keeps it in the sum)
template <typename T>
inline float row_lse512(const T* x, int64_t n) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = head_mask16(n - i);
    mx = _mm512_mask_max_ps(mx, m, mx, load16(x + i, m));
  }
  const float M = _mm512_reduce_max_ps(mx);
  const __m512 vm = _mm512_set1_ps(M);
  __m512 s = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = head_mask16(n - i);
    s = _mm512_mask_add_ps(s, m, s, exp512(_mm512_sub_ps(load16(x + i, m), vm)));
  }
  return M + std::log(_mm512_reduce_add_ps(s));
}

// dx = g softmax(x) over one row (exp(x - lse) g; the caller subtracts g at the target), in
// x's dtype (bf16: exp512_for, rounded once)
template <typename T>
inline void row_softmax_grad512(const T* x, float lse, float g, T* dx, int64_t n) {
  const __m512 vl = _mm512_set1_ps(lse), vg = _mm512_set1_ps(g);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = head_mask16(n - i);
    const __m512 d = _mm512_sub_ps(load16(x + i, m), vl);
    store16(dx + i, m, _mm512_mul_ps(exp512_for<sizeof(T) == 2>(d), vg));
  }
}

