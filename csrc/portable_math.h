// Portable loops of the element-wise CPU kernels (layer_norm.cpp, cross_entropy.cpp,
// activations.cpp), written so that the compiler vectorises them (`omp simd`). No include guard
// on purpose: portable_namespaces.h includes it twice, as namespace generic (the baseline x86-64
// / any CPU) and as namespace avx2 (compiled for AVX2 + FMA), after activation_math.h.

// The sum over one row of f(x) in float32, kLanes partial sums (one vector register of AVX2
// holds 8): a single `omp simd reduction` keeps one vector accumulator, whose add latency bounded
// the LayerNorm's two reductions (2x slower on an AMD EPYC with AVX2, 2026-12-07).
constexpr int64_t kLanes = 32;

template <typename T, typename F>
float row_sum_of(const T* x, int64_t n, F f) {
  float acc[kLanes] = {};
  const int64_t nb = n - n % kLanes;
  for (int64_t i = 0; i < nb; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += f(to_float(x[i + j]));
  }
  float s = 0.0f;
  for (int64_t i = nb; i < n; ++i) s += f(to_float(x[i]));
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// LayerNorm rows of n elements: y = (x - mean) * rstd * w + b, mean[r], rstd[r] in float32. T is
// float or uint16_t (bf16 bits); w, b are n floats.
template <typename T>
void layer_norm_rows(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd,
                     int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    T* yr = y + r * n;
    const float mu = row_sum_of(xr, n, [](float v) { return v; }) / float(n);
    const float var = row_sum_of(xr, n, [mu](float v) { return (v - mu) * (v - mu); }) / float(n);
    const float rs = 1.0f / std::sqrt(var + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
      yr[i] = from_float<T>((to_float(xr[i]) - mu) * rs * w[i] + b[i]);
    mean[r] = mu;
    rstd[r] = rs;
  }
}

// Cross-entropy rows, n >= 1 logits a row in float32 arithmetic: the row's log-sum-exp (NaN
// anywhere in the row gives NaN: exp_approx keeps it in the sum)
template <typename T>
float row_lse(const T* x, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, to_float(x[i]));
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_approx(to_float(x[i]) - mx);
  return mx + std::log(s);
}

// dx = g softmax(x) over one row (exp(x - lse) g; the caller subtracts g at the target)
template <typename T>
void row_softmax_grad(const T* x, float lse, float g, T* dx, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dx[i] = from_float<T>(exp_approx(to_float(x[i]) - lse) * g);
}

// GELU (tanh approximation) and its gradient over n elements (activations.cpp)
inline void gelu_tanh_loop(const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = gelu_tanh(x[i]);
}

inline void bf16_to_float_loop(const uint16_t* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_float(x[i]);
}

inline void float_to_bf16_loop(const float* x, uint16_t* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16(x[i]);
}

// bf16 through the float32 loop in L1-sized chunks (one fused loop over bf16 vectorised 2-3x
// worse than this with GCC 12)
inline void gelu_tanh_bf16_loop(const uint16_t* x, uint16_t* y, int64_t n) {
  constexpr int64_t kChunk = 1024;
  alignas(64) float in[kChunk], out[kChunk];
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t m = std::min(kChunk, n - i);
    bf16_to_float_loop(x + i, in, m);
    gelu_tanh_loop(in, out, m);
    float_to_bf16_loop(out, y + i, m);
  }
}

inline void gelu_tanh_backward_loop(const float* g, const float* x, float* dx, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dx[i] = g[i] * gelu_tanh_grad(x[i]);
}

inline void gelu_tanh_backward_bf16_loop(const uint16_t* g, const uint16_t* x, uint16_t* dx,
                                         int64_t n) {
  constexpr int64_t kChunk = 1024;
  alignas(64) float gin[kChunk], xin[kChunk], out[kChunk];
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t m = std::min(kChunk, n - i);
    bf16_to_float_loop(g + i, gin, m);
    bf16_to_float_loop(x + i, xin, m);
    gelu_tanh_backward_loop(gin, xin, out, m);
    float_to_bf16_loop(out, dx + i, m);
  }
}
