// Portable row loops of the element-wise CPU kernels (layer_norm.cpp, cross_entropy.cpp), written
// so that the compiler vectorises them (`omp simd`). No include guard on purpose:
// portable_namespaces.h includes it twice, as namespace generic (the baseline x86-64 / any CPU)
// and as namespace avx2 (compiled for AVX2 + FMA), after activation_math.h.

// LayerNorm rows of n elements: y = (x - mean) * rstd * w + b, mean[r], rstd[r] in float32. T is
// float or uint16_t (bf16 bits); w, b are n floats.
template <typename T>
void layer_norm_rows(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd,
                     int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    T* yr = y + r * n;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += to_float(xr[i]);
    const float mu = s / float(n);
    float v = 0.0f;
#pragma omp simd reduction(+ : v)
    for (int64_t i = 0; i < n; ++i) {
      const float d = to_float(xr[i]) - mu;
      v += d * d;
    }
    const float rs = 1.0f / std::sqrt(v / float(n) + eps);
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
