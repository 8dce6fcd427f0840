// Memory-attention CPU kernels for one instruction set. memory_attention_cpu.cpp includes this
// file several times, each time inside its own namespace, under its own `#pragma GCC target`
// and with RMT_MA_ISA set: 0 portable C++ (with RMT_MA_AVX2 defined: compiled for AVX2 + FMA, the
// float32 products on an 8-lane microkernel), 1 AVX-512F (float32 FMA microkernels), 2 AVX-512
// with BF16 dot products (_mm512_dpbf16_ps), 3 as 2 with the bf16 products of whole 16-row tiles
// on AMX-BF16 (_tile_dpbf16ps). No #include here: every header comes in before (the
// 16-lane element math, exp512 and the bf16 loads, from avx512_math.h).
//
// Scheme (FlashAttention-2 style, transposed): a task owns kBR query rows of one (batch, head).
// For every key tile it may see (Plan::row_tiles: block skipping), it computes the transposed
// scores S^T = K Q^T ([keys, queries], float32), so that the per-query running max, sum and
// rescaling are vertical (column) vector operations with no horizontal reductions, and the
// value product runs as O^T += V^T P^T; the forward takes up to kFwdGroup key tiles per
// online-softmax step (one max update and accumulator rescale per group; with AMX one value
// product over a run of consecutive whole tiles). The backward pass recomputes P^T from the saved
// log-sum-exp and forms dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q and
// dQ^T += K^T dS^T, again without transposing a tile. All products are one register-blocked
// microkernel C[M, N] (+)= A[M, K] B[K, N], B packed with pairs of K interleaved ("VNNI" layout,
// [K/2][N][2]) for bf16 so that one _mm512_dpbf16_ps does 16 columns x 2 K steps, float32
// accumulation throughout; with AMX (RMT_MA_ISA 3) the bf16 products of whole 16-row blocks
// run on tiles instead (amx_block, same operand layouts). Written by hand: the online softmax,
// masking and bf16 repacking are interleaved with the products tile by tile, and ATen's tile
// GEMM helpers (at::native::cpublas) are internal, not an API for extensions.

static_assert(kBR % 16 == 0 && kBK % 16 == 0, "tiles are whole 16-lane vectors");

// ------------------------------------------------------------------------ element conversions

// bf16 <-> float: to_float / from_float of activation_math.h (round to nearest even, NaN stays
// NaN)

// an input element in the packed type: bf16 bits stay bits, anything else goes through float
template <typename PT, typename TIn>
inline PT to_packed(TIn x) {
  if constexpr (sizeof(PT) == sizeof(TIn)) {
    return x;
  } else {
    return from_float<PT>(to_float(x));
  }
}

// exp(x), exactly 0 for x < -87 (so -inf scores give 0, not the clamp's 1e-38), NaN stays NaN.
// A product, not a select: GCC 12 does not vectorise a loop over `x < -87 ? 0 : y` ("control
// flow in loop"); y is finite there (exp_approx clamps x), so y * 0 is 0.
inline float exp_or_zero(float x) {
  return exp_approx(x) * static_cast<float>(!(x < -87.0f));
}

// dst[2m] = bf16(r0[m]), dst[2m + 1] = bf16(r1[m]), m < n (n a multiple of 16)
inline void to_bf16_pairs(const float* r0, const float* r1, uint16_t* dst, int64_t n) {
#if RMT_MA_ISA >= 2
  alignas(64) static const int16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22,
                                                7, 23, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13,
                                                29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(order);
  for (int64_t m = 0; m < n; m += 16) {
    // low 16 lanes: r0, high 16 lanes: r1; then interleave
    const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(r1 + m), _mm512_loadu_ps(r0 + m));
    _mm512_storeu_si512(dst + 2 * m, _mm512_permutexvar_epi16(idx, (__m512i)both));
  }
#else
  for (int64_t m = 0; m < n; ++m) {
    dst[2 * m] = float_to_bf16(r0[m]);
    dst[2 * m + 1] = float_to_bf16(r1[m]);
  }
#endif
}

inline void to_bf16_row(const float* src, uint16_t* dst, int64_t n) {
#if RMT_MA_ISA >= 2
  for (int64_t m = 0; m < n; m += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + m),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + m)));
  }
#else
  for (int64_t m = 0; m < n; ++m) dst[m] = float_to_bf16(src[m]);
#endif
}

// ------------------------------------------------------------------------------- microkernel

template <typename PT>
constexpr int kPair = sizeof(PT) == 2 ? 2 : 1;

// C[MR, 16 NV] (+)= A[MR, K] B[K, 16 NV] with K = ksteps * PAIR. A row m starts at A + m * lda
// (PAIR consecutive K elements per step); step ks of B starts at B + ks * ldb and holds the
// 16 NV columns with their PAIR K elements interleaved.
template <typename PT, int MR, int NV>
void ukernel(int64_t ksteps, const PT* __restrict A, int64_t lda, const PT* __restrict B,
             int64_t ldb, float* __restrict C, int64_t ldc, bool accumulate) {
#if RMT_MA_ISA >= 1
  constexpr bool kBf16 = sizeof(PT) == 2;
  if constexpr (!kBf16 || RMT_MA_ISA >= 2) {
    __m512 c[MR][NV];
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NV; ++j)
        c[m][j] = accumulate ? _mm512_loadu_ps(C + m * ldc + 16 * j) : _mm512_setzero_ps();
    for (int64_t ks = 0; ks < ksteps; ++ks) {
      const PT* b = B + ks * ldb;
      if constexpr (kBf16) {
#if RMT_MA_ISA >= 2
        __m512bh bv[NV];
        for (int j = 0; j < NV; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(b + 32 * j);
        for (int m = 0; m < MR; ++m) {
          int32_t word;
          std::memcpy(&word, A + m * lda + 2 * ks, 4);
          const __m512bh a = (__m512bh)_mm512_set1_epi32(word);
          for (int j = 0; j < NV; ++j) c[m][j] = _mm512_dpbf16_ps(c[m][j], a, bv[j]);
        }
#endif
      } else {
        __m512 bv[NV];
        for (int j = 0; j < NV; ++j) bv[j] = _mm512_loadu_ps(b + 16 * j);
        for (int m = 0; m < MR; ++m) {
          const __m512 a = _mm512_set1_ps(A[m * lda + ks]);
          for (int j = 0; j < NV; ++j) c[m][j] = _mm512_fmadd_ps(a, bv[j], c[m][j]);
        }
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NV; ++j) _mm512_storeu_ps(C + m * ldc + 16 * j, c[m][j]);
    return;
  }
#endif
#ifdef RMT_MA_AVX2
  if constexpr (sizeof(PT) == 4) {
    // AVX2 + FMA (8 lanes, 16 ymm registers): one 16-column slice at a time, MR x 2
    // accumulators (12 at MR 6), 2 B vectors and one broadcast
    for (int j = 0; j < NV; ++j) {
      __m256 c[MR][2];
      for (int m = 0; m < MR; ++m)
        for (int h = 0; h < 2; ++h)
          c[m][h] = accumulate ? _mm256_loadu_ps(C + m * ldc + 16 * j + 8 * h)
                               : _mm256_setzero_ps();
      for (int64_t ks = 0; ks < ksteps; ++ks) {
        const PT* b = B + ks * ldb + 16 * j;
        const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        for (int m = 0; m < MR; ++m) {
          const __m256 a = _mm256_broadcast_ss(A + m * lda + ks);
          c[m][0] = _mm256_fmadd_ps(a, b0, c[m][0]);
          c[m][1] = _mm256_fmadd_ps(a, b1, c[m][1]);
        }
      }
      for (int m = 0; m < MR; ++m)
        for (int h = 0; h < 2; ++h) _mm256_storeu_ps(C + m * ldc + 16 * j + 8 * h, c[m][h]);
    }
    return;
  }
#endif
  constexpr int PAIR = kPair<PT>, N = 16 * NV;
  float c[MR][N];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < N; ++n) c[m][n] = accumulate ? C[m * ldc + n] : 0.0f;
  for (int64_t ks = 0; ks < ksteps; ++ks) {
    const PT* b = B + ks * ldb;
    for (int p = 0; p < PAIR; ++p) {
      float bf[N];
      for (int n = 0; n < N; ++n) bf[n] = to_float(b[n * PAIR + p]);
      for (int m = 0; m < MR; ++m) {
        const float a = to_float(A[m * lda + ks * PAIR + p]);
#pragma omp simd
        for (int n = 0; n < N; ++n) c[m][n] += a * bf[n];
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < N; ++n) C[m * ldc + n] = c[m][n];
}

template <typename PT>
using UKernel = void (*)(int64_t, const PT*, int64_t, const PT*, int64_t, float*, int64_t, bool);

constexpr int kMR = 6;  // 6 x 4 accumulators + 4 B vectors + 1 broadcast of 32 zmm registers

template <typename PT, int NV>
UKernel<PT> ukernel_rows(int64_t mr) {
  switch (mr) {
    case 1: return &ukernel<PT, 1, NV>;
    case 2: return &ukernel<PT, 2, NV>;
    case 3: return &ukernel<PT, 3, NV>;
    case 4: return &ukernel<PT, 4, NV>;
    case 5: return &ukernel<PT, 5, NV>;
    default: return &ukernel<PT, 6, NV>;
  }
}

template <typename PT>
UKernel<PT> pick_ukernel(int64_t mr, int64_t nv) {
  switch (nv) {
    case 1: return ukernel_rows<PT, 1>(mr);
    case 2: return ukernel_rows<PT, 2>(mr);
    case 3: return ukernel_rows<PT, 3>(mr);
    default: return ukernel_rows<PT, 4>(mr);
  }
}

// C[M, N] (+)= A[M, K] B[K, N], N a multiple of 16 (layouts as for ukernel), on vector registers.
template <typename PT>
void gemm_vec(int64_t M, int64_t N, int64_t ksteps, const PT* A, int64_t lda, const PT* B,
              int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int PAIR = kPair<PT>;
  if (ksteps == 0) {
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.0f);
    return;
  }
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t nv = std::min<int64_t>(4, (N - n0) / 16);
    const UKernel<PT> full = pick_ukernel<PT>(kMR, nv);
    int64_t m0 = 0;
    for (; m0 + kMR <= M; m0 += kMR)
      full(ksteps, A + m0 * lda, lda, B + n0 * PAIR, ldb, C + m0 * ldc + n0, ldc, accumulate);
    if (m0 < M)
      pick_ukernel<PT>(M - m0, nv)(ksteps, A + m0 * lda, lda, B + n0 * PAIR, ldb,
                                    C + m0 * ldc + n0, ldc, accumulate);
  }
}

#if RMT_MA_ISA >= 3
// AMX-BF16 tiles (written by hand: ATen's brgemm wrapper is internal, see the top of the file).
// One configuration for every product: eight 16 x 64-byte tiles, C blocks in tiles 0-3
// (C[mi][nj] in 2 mi + nj: 16 x 16 float32 each), A in 4-5 (16 rows x 32 bf16), B in 6-7 (16 K
// pairs x 16 columns x 2: exactly the VNNI layout ukernel reads). The tile registers
// are per thread and other libraries (oneDNN) configure them too, so every kernel entry loads
// the configuration and releases the tiles when it returns (TileScope).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

struct TileScope {
  bool on;
  explicit TileScope(bool bf16) : on(bf16) {
    static const TileConfig cfg;
    if (on) _tile_loadconfig(&cfg);
  }
  ~TileScope() {
    if (on) _tile_release();
  }
};

// C[16 MT, 32] (+)= A[16 MT, 32 kc] B[16 kc][32][2] over kc chunks of 16 K pairs; lda, ldb,
// ldc in elements; chunk kc of A starts at A + kc * a_chunk (32: one matrix; larger: the
// chunks are separate [16 MT, 32] blocks, e.g. the V^T of consecutive key tiles)
template <int MT>
inline void amx_block(int64_t kchunks, const uint16_t* A, int64_t lda, const uint16_t* B,
                      int64_t ldb, float* C, int64_t ldc, bool accumulate, int64_t a_chunk) {
  const int64_t sa = lda * 2, sb = ldb * 2, sc = ldc * 4;
  __asm__ volatile("" ::: "memory");  // the tile loads' asm does not say it reads memory
  if (accumulate) {
    _tile_loadd(0, C, sc);
    _tile_loadd(1, C + 16, sc);
    if constexpr (MT == 2) _tile_loadd(2, C + 16 * ldc, sc);
    if constexpr (MT == 2) _tile_loadd(3, C + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (MT == 2) _tile_zero(2);
    if constexpr (MT == 2) _tile_zero(3);
  }
  for (int64_t kc = 0; kc < kchunks; ++kc) {
    const uint16_t* a = A + a_chunk * kc;
    const uint16_t* b = B + 16 * kc * ldb;
    _tile_loadd(4, a, sa);
    _tile_loadd(6, b, sb);
    _tile_loadd(7, b + 32, sb);
    if constexpr (MT == 2) _tile_loadd(5, a + 16 * lda, sa);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MT == 2) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, C, sc);
  _tile_stored(1, C + 16, sc);
  if constexpr (MT == 2) _tile_stored(2, C + 16 * ldc, sc);
  if constexpr (MT == 2) _tile_stored(3, C + 16 * ldc + 16, sc);
}

// C[mt, N] (+)= A[mt, 32 kchunks] B (amx_block's layouts, chunk kc of A at A + kc * a_chunk)
// on tiles: mt a multiple of 16, N of 32
inline void amx_rows(int64_t mt, int64_t N, int64_t kchunks, const uint16_t* A, int64_t lda,
                     int64_t a_chunk, const uint16_t* B, int64_t ldb, float* C, int64_t ldc,
                     bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 32) {
    for (int64_t m0 = 0; m0 < mt; m0 += 32) {
      const uint16_t* a = A + m0 * lda;
      const uint16_t* b = B + n0 * 2;
      float* c = C + m0 * ldc + n0;
      if (mt - m0 >= 32) {
        amx_block<2>(kchunks, a, lda, b, ldb, c, ldc, accumulate, a_chunk);
      } else {
        amx_block<1>(kchunks, a, lda, b, ldb, c, ldc, accumulate, a_chunk);
      }
    }
  }
}
#else
struct TileScope {
  explicit TileScope(bool) {}
};
#endif

// C[M, N] (+)= A[M, K] B[K, N], N a multiple of 16 (layouts as for ukernel). With AMX (bf16)
// and K, N multiples of 32 (every product of a whole key tile: K and N are Dp, kBR or kBK): the
// whole 16-row blocks on tiles, the last rows on vector registers; other shapes (a partial key
// tile's P^T and dS^T products) all on vector registers.
template <typename PT>
void gemm(int64_t M, int64_t N, int64_t ksteps, const PT* A, int64_t lda, const PT* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
#if RMT_MA_ISA >= 3
  if constexpr (sizeof(PT) == 2) {
    const int64_t mt = M / 16 * 16;
    if (mt > 0 && ksteps > 0 && ksteps % 16 == 0 && N % 32 == 0) {
      amx_rows(mt, N, ksteps / 16, A, lda, 32, B, ldb, C, ldc, accumulate);
      if (mt < M)  // the last rows
        gemm_vec<PT>(M - mt, N, ksteps, A + mt * lda, lda, B, ldb, C + mt * ldc, ldc, accumulate);
      return;
    }
  }
#endif
  gemm_vec<PT>(M, N, ksteps, A, lda, B, ldb, C, ldc, accumulate);
}

// C[M, N] += sum_{g < G} A_g[M, kBK] B_g[kBK, N] over G whole key tiles: A_g = A + g * a_step
// (lda within a tile), B_g = B + g * kBK / PAIR * ldb (the tiles' B stacked). With AMX (bf16,
// N a multiple of 32) the whole 16-row blocks run as one tile product over all G tiles (the C
// tiles loaded and stored once, not once per key tile); otherwise one gemm per key tile.
template <typename PT>
void gemm_tiles(int64_t M, int64_t N, int64_t G, const PT* A, int64_t lda, int64_t a_step,
                const PT* B, int64_t ldb, float* C, int64_t ldc) {
  constexpr int PAIR = kPair<PT>;
  int64_t mt = 0;  // rows done on tiles
#if RMT_MA_ISA >= 3
  if constexpr (sizeof(PT) == 2) {
    static_assert(kBK == 32, "one AMX K chunk (16 pairs) per key tile");
    if (N % 32 == 0) {
      mt = M / 16 * 16;
      amx_rows(mt, N, G, A, lda, a_step, B, ldb, C, ldc, true);
    }
  }
#endif
  if (mt < M)
    for (int64_t g = 0; g < G; ++g)
      gemm<PT>(M - mt, N, kBK / PAIR, A + g * a_step + mt * lda, lda, B + g * (kBK / PAIR) * ldb,
               ldb, C + mt * ldc, ldc, true);
}

// ------------------------------------------------------------------------------------ helpers

// Per-thread scratch that outlives the call: a slot keeps its 64-byte aligned block and only
// grows, so that steady-state calls neither allocate nor fault in fresh pages (a malloc of this
// size is an mmap, and that was most of a small call's time). Not zeroed.
enum ScratchSlot : int {
  kPackStage, kPackPairs,                                        // pack_kv_t
  kFwdStage, kFwdQt, kFwdS, kFwdOt, kFwdTmp, kFwdP,              // forward_t
  kBwdQs, kBwdQt, kBwdQn, kBwdDos, kBwdDot, kBwdDon, kBwdOs, kBwdPn,  // backward_head
  kBwdDsn, kBwdDsv, kBwdS, kBwdDp, kBwdDqt, kBwdTmp, kBwdCap,
  kUnitKn, kUnitVn, kUnitVt, kUnitKt, kUnitDk, kUnitDv,          // *_units_t
  kRowsQ, kRowsAcc, kRowsK, kRowsV, kRowsStat,                   // forward_rows_t
  kScratchSlots
};

struct ScratchArena {
  void* ptr[kScratchSlots] = {};
  size_t bytes[kScratchSlots] = {};
  ~ScratchArena() {
    for (void* p : ptr) std::free(p);
  }
};

inline void* scratch(int slot, size_t bytes) {
  thread_local ScratchArena arena;
  bytes = (std::max<size_t>(bytes, 64) + 63) / 64 * 64;
  if (arena.bytes[slot] < bytes) {
    std::free(arena.ptr[slot]);
    arena.ptr[slot] = std::aligned_alloc(64, bytes);
    arena.bytes[slot] = arena.ptr[slot] != nullptr ? bytes : 0;
    TORCH_CHECK(arena.ptr[slot] != nullptr, "memory_attention_cpu: out of memory for ", bytes,
                " bytes of scratch");
  }
  return arena.ptr[slot];
}

template <typename T>
struct Buffer {  // n elements of the calling thread's scratch slot
  T* data;
  Buffer(int slot, int64_t n)
      : data(static_cast<T*>(scratch(slot, static_cast<size_t>(std::max<int64_t>(n, 1)) *
                                               sizeof(T)))) {}
};

template <typename TIn>
inline const TIn* at4(const Strided& t, int64_t b, int64_t h, int64_t i) {
  return static_cast<const TIn*>(t.ptr) + b * t.s0 + h * t.s1 + i * t.s2;
}

inline bool key_kept(const Plan& pl, int64_t b, int64_t j) {
  return pl.keep[b * pl.keep_s0 + j * pl.keep_s1];
}

// dst[c * ldd + r] = src[r * lds + c] for 32-bit words (a bf16 pair moves as one word),
// r < rows and c < cols, both multiples of 16
inline void transpose32(const void* src_v, int64_t lds, void* dst_v, int64_t ldd, int64_t rows,
                        int64_t cols) {
  const uint32_t* src = static_cast<const uint32_t*>(src_v);
  uint32_t* dst = static_cast<uint32_t*>(dst_v);
#if RMT_MA_ISA >= 1
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      __m512i r[16], t[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + (r0 + i) * lds + c0);
      for (int k = 0; k < 8; ++k) {
        t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
      }
      // r[4k + x], 128-bit lane l: rows 4k..4k+3 of column 4l + x
      for (int k = 0; k < 4; ++k) {
        r[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
        r[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
        r[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
        r[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
      }
      for (int x = 0; x < 4; ++x) {
        const __m512i v0 = _mm512_shuffle_i32x4(r[x], r[4 + x], 0x88);   // lanes 0, 2
        const __m512i w0 = _mm512_shuffle_i32x4(r[x], r[4 + x], 0xdd);   // lanes 1, 3
        const __m512i v1 = _mm512_shuffle_i32x4(r[8 + x], r[12 + x], 0x88);
        const __m512i w1 = _mm512_shuffle_i32x4(r[8 + x], r[12 + x], 0xdd);
        uint32_t* out = dst + (c0 + x) * ldd + r0;
        _mm512_storeu_si512(out, _mm512_shuffle_i32x4(v0, v1, 0x88));
        _mm512_storeu_si512(out + 4 * ldd, _mm512_shuffle_i32x4(w0, w1, 0x88));
        _mm512_storeu_si512(out + 8 * ldd, _mm512_shuffle_i32x4(v0, v1, 0xdd));
        _mm512_storeu_si512(out + 12 * ldd, _mm512_shuffle_i32x4(w0, w1, 0xdd));
      }
    }
  }
#else
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
#endif
}

// rows [i0, i0 + rows) of x (b, h) as a zero-padded [kBR][Dp] matrix of PT
template <typename TIn, typename PT>
void stage_rows(const Plan& pl, const Strided& x, int64_t b, int64_t h, int64_t i0, int64_t rows,
                PT* dst) {
  const int64_t Dp = pl.Dp, D = pl.D;
  for (int64_t m = 0; m < kBR; ++m) {
    PT* row = dst + m * Dp;
    if (m >= rows) {
      std::fill(row, row + Dp, PT(0));
      continue;
    }
    const TIn* src = at4<TIn>(x, b, h, i0 + m);
    if (sizeof(TIn) == sizeof(PT) && x.s3 == 1) {
      std::memcpy(row, src, D * sizeof(PT));
    } else {
      for (int64_t d = 0; d < D; ++d) row[d] = to_packed<PT>(src[d * x.s3]);
    }
    std::fill(row + D, row + Dp, PT(0));
  }
}

// staged rows [kBR][Dp] as B operand with K = head dim: [Dp/PAIR][kBR][PAIR]
template <typename PT>
void pack_t(const Plan& pl, const PT* stage, PT* dst) {
  const int64_t words = pl.Dp * static_cast<int64_t>(sizeof(PT)) / 4;
  transpose32(stage, words, dst, kBR, kBR, words);
}

// staged bf16 rows [kBR][Dp] as B operand with K = rows: [kBR/2][Dp][2]
inline void pack_n_bf16(const Plan& pl, const uint16_t* stage, uint16_t* dst) {
  const int64_t Dp = pl.Dp;
#if RMT_MA_ISA >= 2
  alignas(64) static const int16_t lo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7,
                                             39, 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45,
                                             14, 46, 15, 47};
  alignas(64) static const int16_t hi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22,
                                             54, 23, 55, 24, 56, 25, 57, 26, 58, 27, 59, 28, 60,
                                             29, 61, 30, 62, 31, 63};
  const __m512i ilo = _mm512_load_si512(lo), ihi = _mm512_load_si512(hi);
  for (int64_t p = 0; p < kBR / 2; ++p) {
    const uint16_t* r0 = stage + 2 * p * Dp;
    uint16_t* out = dst + p * 2 * Dp;
    for (int64_t d = 0; d < Dp; d += 32) {
      const __m512i a = _mm512_loadu_si512(r0 + d), c = _mm512_loadu_si512(r0 + Dp + d);
      _mm512_storeu_si512(out + 2 * d, _mm512_permutex2var_epi16(a, ilo, c));
      _mm512_storeu_si512(out + 2 * d + 32, _mm512_permutex2var_epi16(a, ihi, c));
    }
  }
#else
  for (int64_t p = 0; p < kBR / 2; ++p)
    for (int64_t d = 0; d < Dp; ++d)
      for (int e = 0; e < 2; ++e) dst[(p * Dp + d) * 2 + e] = stage[(2 * p + e) * Dp + d];
#endif
}

// dst[d] = TIn(src[d] * mul), d < n
template <typename TIn>
inline void store_row(const float* src, float mul, TIn* dst, int64_t n) {
  int64_t d = 0;
#if RMT_MA_ISA >= 1
  const __m512 vm = _mm512_set1_ps(mul);
  for (; d + 16 <= n; d += 16) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(src + d), vm);
    if constexpr (sizeof(TIn) == 2) {
#if RMT_MA_ISA >= 2
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), (__m256i)_mm512_cvtneps_pbh(x));
#else
      alignas(64) float tmp[16];
      _mm512_store_ps(tmp, x);
      for (int i = 0; i < 16; ++i) dst[d + i] = float_to_bf16(tmp[i]);
#endif
    } else {
      _mm512_storeu_ps(dst + d, x);
    }
  }
#endif
  for (; d < n; ++d) dst[d] = from_float<TIn>(src[d] * mul);
}

// rows [0, rows) of dst ([rows][D], rows ldd apart) = the transposed accumulator acc [Dp][kBR]
// (rows >= D zero) times mul[m]; tmp: [kBR][Dp] scratch
template <typename TIn>
void store_rows_t(const Plan& pl, const float* acc, const float* mul, TIn* dst, int64_t ldd,
                  int64_t rows, float* tmp) {
  transpose32(acc, kBR, tmp, pl.Dp, pl.Dp, kBR);
  for (int64_t m = 0; m < rows; ++m) store_row<TIn>(tmp + m * pl.Dp, mul[m], dst + m * ldd, pl.D);
}

// -------------------------------------------------------------------------------- packing K/V

// Pack keys/values of (b, hk) pairs [bh0, bh1): kn/vn row-major [Lk][Dp], vt/kt per tile
// transposed [Dp][kBK] (null pointers are skipped).
template <typename TIn, typename PT>
void pack_kv_t(const Plan& pl, const Strided& k, const Strided& v, const Strided& pk,
               const Strided& pv, const Workspace& ws, int64_t bh0, int64_t bh1) {
  constexpr int PAIR = kPair<PT>;
  static_assert(kBK == kBR, "key tiles are staged like row blocks");
  const int64_t Dp = pl.Dp, nt = pl.ntiles();
  Buffer<PT> stage(kPackStage, kBK * Dp), pairs(kPackPairs, PAIR == 2 ? kBK * Dp : 1);
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t b = bh / pl.Hkv, hk = bh % pl.Hkv;
    for (int which = 0; which < 2; ++which) {  // 0: keys, 1: values
      PT* rows = static_cast<PT*>(which == 0 ? ws.kn : ws.vn);
      PT* trans = static_cast<PT*>(which == 0 ? ws.kt : ws.vt);
      if (rows == nullptr && trans == nullptr) continue;
      for (int64_t t = 0; t < nt; ++t) {
        const KeyTile tile = pl.tiles[t];
        const bool past = tile.start < pl.P;  // a tile never straddles past and current keys
        const Strided& src = which == 0 ? (past ? pk : k) : (past ? pv : v);
        const int64_t first = past ? tile.start : tile.start - pl.P;
        stage_rows<TIn, PT>(pl, src, b, hk, first, tile.end - tile.start, stage.data);
        if (rows != nullptr)
          std::memcpy(rows + (ws.slot(bh) * pl.Lk + tile.start) * Dp, stage.data,
                      (tile.end - tile.start) * Dp * sizeof(PT));
        if (trans == nullptr) continue;
        PT* dst = trans + (ws.slot(bh) * nt + t) * Dp * kBK;
        if constexpr (PAIR == 2) {
          // key pairs interleaved ([kBK/2][Dp] words), then words transposed: row d holds
          // keys 0, 1, 2, ... of the tile
          pack_n_bf16(pl, reinterpret_cast<const uint16_t*>(stage.data),
                      reinterpret_cast<uint16_t*>(pairs.data));
          transpose32(pairs.data, Dp, dst, kBK / 2, kBK / 2, Dp);
        } else {
          transpose32(stage.data, Dp, dst, kBK, kBK, Dp);
        }
      }
    }
  }
}


// Scores of one tile, in place in s [kt][kBR]: scaled, soft-capped (kCap: x -> c tanh(x / c),
// c = pl.softcap; with dcap [kt][kBR], also its derivative 1 - tanh^2 there, 0 where hidden),
// and -inf where hidden (the element mask on mixed tiles, padded keys on every tile; after the
// cap, which would turn -inf into -c). With tmax, also the column (per query) maxima.
template <bool kCap>
inline void scale_mask_tile_t(const Plan& pl, float* s, int64_t kt, int64_t jstart, int64_t i0,
                              bool mixed, bool pad_rows, int64_t b, float* tmax, float* dcap) {
  const float scale = pl.scale, ninf = -std::numeric_limits<float>::infinity();
  // capped: t = tanh(s tscale) of the unscaled score s, x = cap t
  const float cap = pl.softcap, tscale = kCap ? pl.scale / pl.softcap : 0.0f;
  const int32_t* lo0 = pl.lo0.data() + i0;
  const int32_t* hi0 = pl.hi0.data() + i0;
  const int32_t* lo1 = pl.lo1.data() + i0;
  const int32_t* hi1 = pl.hi1.data() + i0;
#if RMT_MA_ISA >= 1
  constexpr int NV = kBR / 16;
  const __m512 sc = _mm512_set1_ps(scale), vninf = _mm512_set1_ps(ninf);
  const __m512 vcap = _mm512_set1_ps(cap), vtscale = _mm512_set1_ps(tscale);
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 mx[NV];
  for (int c = 0; c < NV; ++c) mx[c] = vninf;
  for (int64_t n = 0; n < kt; ++n) {
    float* row = s + n * kBR;
    const int32_t j = static_cast<int32_t>(jstart + n);
    if (pad_rows && !key_kept(pl, b, j)) {
      for (int c = 0; c < NV; ++c) _mm512_storeu_ps(row + 16 * c, vninf);
      if (kCap && dcap != nullptr) std::fill(dcap + n * kBR, dcap + (n + 1) * kBR, 0.0f);
      continue;
    }
    const __m512i jv = _mm512_set1_epi32(j);
    for (int c = 0; c < NV; ++c) {
      __mmask16 in = 0xffff;
      if (mixed) {
        const __mmask16 in0 =
            _mm512_cmple_epi32_mask(_mm512_loadu_si512(lo0 + 16 * c), jv) &
            _mm512_cmpgt_epi32_mask(_mm512_loadu_si512(hi0 + 16 * c), jv);
        const __mmask16 in1 =
            _mm512_cmple_epi32_mask(_mm512_loadu_si512(lo1 + 16 * c), jv) &
            _mm512_cmpgt_epi32_mask(_mm512_loadu_si512(hi1 + 16 * c), jv);
        in = in0 | in1;
      }
      __m512 x;
      if constexpr (kCap) {
        const __m512 t = tanh512(_mm512_mul_ps(_mm512_loadu_ps(row + 16 * c), vtscale));
        x = _mm512_mask_mul_ps(vninf, in, t, vcap);
        if (dcap != nullptr)
          _mm512_storeu_ps(dcap + n * kBR + 16 * c,
                           _mm512_maskz_mov_ps(in, _mm512_fnmadd_ps(t, t, one)));
      } else {
        x = _mm512_mask_mul_ps(vninf, in, _mm512_loadu_ps(row + 16 * c), sc);
      }
      _mm512_storeu_ps(row + 16 * c, x);
      mx[c] = _mm512_max_ps(mx[c], x);
    }
  }
  if (tmax != nullptr)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(tmax + 16 * c, mx[c]);
#else
  alignas(64) float mx[kBR];
  std::fill(mx, mx + kBR, ninf);
  for (int64_t n = 0; n < kt; ++n) {
    float* row = s + n * kBR;
    const int32_t j = static_cast<int32_t>(jstart + n);
    const bool kept = !pad_rows || key_kept(pl, b, j);
    if constexpr (kCap) {
      for (int64_t m = 0; m < kBR; ++m) {
        const bool vis =
            kept && (!mixed || (j >= lo0[m] && j < hi0[m]) || (j >= lo1[m] && j < hi1[m]));
        const float t = std::tanh(row[m] * tscale);
        if (dcap != nullptr) dcap[n * kBR + m] = vis ? 1.0f - t * t : 0.0f;
        row[m] = vis ? cap * t : ninf;
        mx[m] = std::max(mx[m], row[m]);
      }
    } else {
      // branch-free, so that it vectorises (the AVX2 build)
      const bool whole = !mixed;
#pragma omp simd
      for (int64_t m = 0; m < kBR; ++m) {
        const bool vis =
            kept & (whole | ((j >= lo0[m]) & (j < hi0[m])) | ((j >= lo1[m]) & (j < hi1[m])));
        row[m] = vis ? row[m] * scale : ninf;
        mx[m] = std::max(mx[m], row[m]);
      }
    }
  }
  if (tmax != nullptr) std::copy(mx, mx + kBR, tmax);
#endif
}

inline void scale_mask_tile(const Plan& pl, float* s, int64_t kt, int64_t jstart, int64_t i0,
                            bool mixed, bool pad_rows, int64_t b, float* tmax,
                            float* dcap = nullptr) {
  if (pl.softcap > 0.0f) {
    scale_mask_tile_t<true>(pl, s, kt, jstart, i0, mixed, pad_rows, b, tmax, dcap);
  } else {
    scale_mask_tile_t<false>(pl, s, kt, jstart, i0, mixed, pad_rows, b, tmax, nullptr);
  }
}

// row[m] = exp(row[m] - sub[m]) over one kBR row; adds the row to sum when given. kBf16Out:
// the row is rounded to bf16 next (exp512_for)
template <bool kBf16Out = false>
inline void exp_row(float* row, const float* sub, float* sum) {
#if RMT_MA_ISA >= 1
  for (int64_t m = 0; m < kBR; m += 16) {
    const __m512 p =
        exp512_for<kBf16Out>(_mm512_sub_ps(_mm512_loadu_ps(row + m), _mm512_loadu_ps(sub + m)));
    _mm512_storeu_ps(row + m, p);
    if (sum != nullptr) _mm512_storeu_ps(sum + m, _mm512_add_ps(_mm512_loadu_ps(sum + m), p));
  }
#else
  // two loops, each `omp simd`: one loop with the sum test in it stayed scalar (the AVX2 build)
#pragma omp simd
  for (int64_t m = 0; m < kBR; ++m) row[m] = exp_or_zero(row[m] - sub[m]);
  if (sum != nullptr)
#pragma omp simd
    for (int64_t m = 0; m < kBR; ++m) sum[m] += row[m];
#endif
}

// x[m] *= y[m] over n floats (n a multiple of 16)
inline void mul_rows(float* x, const float* y, int64_t n) {
#if RMT_MA_ISA >= 1
  for (int64_t m = 0; m < n; m += 16)
    _mm512_storeu_ps(x + m, _mm512_mul_ps(_mm512_loadu_ps(x + m), _mm512_loadu_ps(y + m)));
#else
#pragma omp simd
  for (int64_t m = 0; m < n; ++m) x[m] *= y[m];
#endif
}

// x[m] = max(x[m], y[m]) over n floats (n a multiple of 16)
inline void max_rows(float* x, const float* y, int64_t n) {
#if RMT_MA_ISA >= 1
  for (int64_t m = 0; m < n; m += 16)
    _mm512_storeu_ps(x + m, _mm512_max_ps(_mm512_loadu_ps(x + m), _mm512_loadu_ps(y + m)));
#else
#pragma omp simd
  for (int64_t m = 0; m < n; ++m) x[m] = std::max(x[m], y[m]);
#endif
}

// sum_d a[d] b[d] over n elements (a multiple of 16), in an order that does not depend on the
// inputs' strides
template <typename PT>
inline float row_dot(const PT* a, const PT* b, int64_t n) {
#if RMT_MA_ISA >= 1
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < n; d += 16) {
    __m512 x, y;
    if constexpr (sizeof(PT) == 2) {
      x = load_bf16x16(a + d);
      y = load_bf16x16(b + d);
    } else {
      x = _mm512_loadu_ps(a + d);
      y = _mm512_loadu_ps(b + d);
    }
    acc = _mm512_fmadd_ps(x, y, acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < n; ++d) acc += to_float(a[d]) * to_float(b[d]);
  return acc;
#endif
}

// dS^T row: ds[m] = p[m] (ds[m] - delta[m]) (ds holds dP^T on entry), times g[m] when given
// (the soft-cap's derivative, scale_mask_tile)
inline void ds_row(const float* p, float* ds, const float* delta, const float* g) {
#if RMT_MA_ISA >= 1
  for (int64_t m = 0; m < kBR; m += 16) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(ds + m), _mm512_loadu_ps(delta + m));
    __m512 x = _mm512_mul_ps(_mm512_loadu_ps(p + m), d);
    if (g != nullptr) x = _mm512_mul_ps(x, _mm512_loadu_ps(g + m));
    _mm512_storeu_ps(ds + m, x);
  }
#else
  if (g != nullptr) {
#pragma omp simd
    for (int64_t m = 0; m < kBR; ++m) ds[m] = p[m] * (ds[m] - delta[m]) * g[m];
  } else {
#pragma omp simd
    for (int64_t m = 0; m < kBR; ++m) ds[m] = p[m] * (ds[m] - delta[m]);
  }
#endif
}

// --------------------------------------------------------------------------------- forward

// The forward's out [B, Hq, L, D] lies in memory as [B, L, Hq, D] (memory_attention_cpu): the
// offset of row i of head h
inline int64_t out_offset(const Plan& pl, int64_t b, int64_t h, int64_t i) {
  return ((b * pl.L + i) * pl.Hq + h) * pl.D;
}

// The online softmax's step per key-tile group over one row block: new running max mrow = max(mrow,
// tmax), alpha = exp(old - new) (0 where the old max was -inf), muse = the max to subtract (0
// for a row that has seen nothing yet), psum = 0. Returns whether any running max moved (else
// alpha == 1 everywhere and the accumulator needs no rescale). Vectorised: per tile, a scalar
// exp per query row was about a tenth of the forward at L 288.
inline bool update_max(float* mrow, const float* tmax, float* alpha, float* muse, float* psum) {
#if RMT_MA_ISA >= 1
  const __m512 vninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 moved = 0;
  for (int64_t m = 0; m < kBR; m += 16) {
    const __m512 old = _mm512_loadu_ps(mrow + m);
    const __m512 mn = _mm512_max_ps(old, _mm512_loadu_ps(tmax + m));
    moved |= _mm512_cmp_ps_mask(mn, old, _CMP_NEQ_UQ);
    const __m512 mu = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mn, vninf, _CMP_EQ_OQ), mn,
                                           _mm512_setzero_ps());
    _mm512_storeu_ps(alpha + m, exp512(_mm512_sub_ps(old, mu)));
    _mm512_storeu_ps(mrow + m, mn);
    _mm512_storeu_ps(muse + m, mu);
    _mm512_storeu_ps(psum + m, _mm512_setzero_ps());
  }
  return moved != 0;
#else
  const float ninf = -std::numeric_limits<float>::infinity();
  int moved = 0;
#pragma omp simd reduction(| : moved)
  for (int64_t m = 0; m < kBR; ++m) {
    const float mn = std::max(mrow[m], tmax[m]);
    moved |= mn != mrow[m];
    const float mu = mn == ninf ? 0.0f : mn;  // a row that has seen nothing yet
    alpha[m] = exp_or_zero(mrow[m] - mu);
    mrow[m] = mn;
    muse[m] = mu;
    psum[m] = 0.0f;
  }
  return moved != 0;
#endif
}

// Key tiles a forward step takes together: one online-softmax update (max, rescale of the
// accumulator) per group, and with AMX one value product over the group's tiles (C tiles
// loaded and stored once per group instead of once per 32 keys)
constexpr int64_t kFwdGroup = 8;

// Row-block tasks [task0, task1) of the forward pass; task = (b * Hq + h) * nrb + rb.
template <typename TIn, typename PT>
void forward_t(const Plan& pl, const Strided& q, const Workspace& ws, TIn* out, float* lse,
               int64_t task0, int64_t task1) {
  constexpr int PAIR = kPair<PT>;
  constexpr int64_t kTileS = kBK * kBR;  // one key tile's S^T (and P^T) block
  const int64_t Dp = pl.Dp, D = pl.D, nt = pl.ntiles();
  const float ninf = -std::numeric_limits<float>::infinity();
  Buffer<PT> stage(kFwdStage, Dp * kBR), qt(kFwdQt, Dp * kBR);
  // an odd partial tile's last P^T pair reads the zeroed row after it, still inside its block
  Buffer<float> s(kFwdS, kFwdGroup * kTileS), ot(kFwdOt, Dp * kBR), tmp(kFwdTmp, Dp * kBR);
  Buffer<PT> pvnni(kFwdP, PAIR == 2 ? kFwdGroup * kTileS : 1);
  alignas(64) float mrow[kBR], lrow[kBR], alpha[kBR], muse[kBR], tmax[kBR], gmax[kBR],
      psum[kBR];
  int64_t gtile[kFwdGroup], gkt[kFwdGroup];
  for (int64_t task = task0; task < task1; ++task) {
    const int64_t rb = task % pl.nrb, bh = task / pl.nrb, b = bh / pl.Hq, h = bh % pl.Hq;
    const int64_t hk = h / pl.groups(), i0 = rb * kBR, rows = std::min(kBR, pl.L - i0);
    stage_rows<TIn, PT>(pl, q, b, h, i0, rows, stage.data);
    pack_t<PT>(pl, stage.data, qt.data);
    std::fill(ot.data, ot.data + Dp * kBR, 0.0f);  // rows >= D stay zero for the transpose
    for (int64_t m = 0; m < kBR; ++m) {
      mrow[m] = ninf;
      lrow[m] = 0.0f;
    }
    const int64_t slot = ws.slot(b * pl.Hkv + hk);
    const PT* kn = static_cast<const PT*>(ws.kn) + slot * pl.Lk * Dp;
    const PT* vt = static_cast<const PT*>(ws.vt) + slot * nt * Dp * kBK;
    const std::vector<TileRef>& refs = pl.row_tiles[rb];
    size_t r = 0;
    while (r < refs.size()) {
      // S^T = K Q^T for up to kFwdGroup visible tiles, scaled and masked; gmax = their max
      int64_t G = 0;
      bool whole_run = true;  // consecutive whole tiles: one value product for the group
      for (; r < refs.size() && G < kFwdGroup; ++r) {
        const TileRef& ref = refs[r];
        const KeyTile tile = pl.tiles[ref.tile];
        const int64_t kt = tile.end - tile.start;
        bool pad_rows = false;
        if (pl.keep != nullptr) {
          const int32_t kept = pl.kept[b * nt + ref.tile];
          if (kept == 0) continue;
          pad_rows = kept < kt;
        }
        float* sg = s.data + G * kTileS;
        gemm<PT>(kt, kBR, Dp / PAIR, kn + tile.start * Dp, Dp, qt.data, kBR * PAIR, sg, kBR,
                 false);
        scale_mask_tile(pl, sg, kt, tile.start, i0, ref.mixed, pad_rows, b,
                        G == 0 ? gmax : tmax);
        if (G > 0) max_rows(gmax, tmax, kBR);
        whole_run = whole_run && kt == kBK && (G == 0 || ref.tile == gtile[G - 1] + 1);
        gtile[G] = ref.tile;
        gkt[G] = kt;
        ++G;
      }
      if (G == 0) break;
      const bool moved = update_max(mrow, gmax, alpha, muse, psum);
      // P^T = exp(S^T - max), summed into psum; bf16: packed in K pairs, tile by tile
      for (int64_t g = 0; g < G; ++g) {
        float* sg = s.data + g * kTileS;
        const int64_t kt = gkt[g];
        if constexpr (PAIR == 2) {
          uint16_t* dst = reinterpret_cast<uint16_t*>(pvnni.data) + g * kTileS;
          for (int64_t n = 0; n < kt; n += 2) {
            float* r0 = sg + n * kBR;
            exp_row<true>(r0, muse, psum);
            if (n + 1 < kt) {
              exp_row<true>(r0 + kBR, muse, psum);
            } else {
              std::fill(r0 + kBR, r0 + 2 * kBR, 0.0f);
            }
            to_bf16_pairs(r0, r0 + kBR, dst + n * kBR, kBR);
          }
        } else {
          for (int64_t n = 0; n < kt; ++n) exp_row(sg + n * kBR, muse, psum);
        }
      }
      for (int64_t m = 0; m < kBR; ++m) lrow[m] = lrow[m] * alpha[m] + psum[m];
      if (moved)
        for (int64_t d = 0; d < D; ++d) mul_rows(ot.data + d * kBR, alpha, kBR);
      // O^T += V^T P^T
      const PT* pbase = PAIR == 2 ? pvnni.data : reinterpret_cast<const PT*>(s.data);
      if (whole_run) {
        gemm_tiles<PT>(D, kBR, G, vt + gtile[0] * Dp * kBK, kBK, Dp * kBK, pbase, kBR * PAIR,
                       ot.data, kBR);
      } else {
        for (int64_t g = 0; g < G; ++g)
          gemm<PT>(D, kBR, (gkt[g] + PAIR - 1) / PAIR, vt + gtile[g] * Dp * kBK, kBK,
                   pbase + g * kTileS, kBR * PAIR, ot.data, kBR, true);
      }
    }
    float* l = lse + bh * pl.L + i0;
    for (int64_t m = 0; m < kBR; ++m) {
      const bool any = lrow[m] > 0.0f;
      alpha[m] = any ? 1.0f / lrow[m] : 0.0f;
      if (m < rows) l[m] = any ? mrow[m] + std::log(lrow[m]) : ninf;
    }
    store_rows_t<TIn>(pl, ot.data, alpha, out + out_offset(pl, b, h, i0), pl.Hq * D, rows,
                      tmp.data);
  }
}

// --------------------------------------------------------------------------------- backward

template <typename PT>
struct BackwardScratch {
  static constexpr int PAIR = kPair<PT>;
  Buffer<PT> qs, qt, qn, dos, dot, don, os, pn, dsn, dsv;
  Buffer<float> s, dp, dqt, tmp, cap;
  explicit BackwardScratch(int64_t Dp)
      : qs(kBwdQs, Dp * kBR), qt(kBwdQt, Dp * kBR), qn(kBwdQn, Dp * kBR),
        dos(kBwdDos, Dp * kBR), dot(kBwdDot, Dp * kBR), don(kBwdDon, Dp * kBR),
        os(kBwdOs, Dp * kBR),
        pn(kBwdPn, PAIR == 2 ? kBK * kBR : 1), dsn(kBwdDsn, PAIR == 2 ? kBK * kBR : 1),
        dsv(kBwdDsv, PAIR == 2 ? (kBK + 1) * kBR : 1), s(kBwdS, kBK * kBR),
        dp(kBwdDp, (kBK + 1) * kBR), dqt(kBwdDqt, Dp * kBR), tmp(kBwdTmp, Dp * kBR),
        cap(kBwdCap, kBK * kBR) {}
};

// Gradients of one (batch b, query head h): dq is written (input dtype, [B, Hq, L, D]
// contiguous); the key/value gradients are added (unscaled) to the float32 accumulators
// dk, dv [Lk][Dp] of that head (or of its whole group, when the caller runs the group's heads
// one after the other).
template <typename TIn, typename PT>
void backward_head(const Plan& pl, const Strided& q, const Strided& dout, const Strided& out,
                   const float* lse, const float* dlse, const Workspace& ws, TIn* dq, int64_t b,
                   int64_t h,
                   float* dk, float* dv, BackwardScratch<PT>& sc) {
  constexpr int PAIR = kPair<PT>;
  const int64_t Dp = pl.Dp, D = pl.D, nt = pl.ntiles();
  const float inf = std::numeric_limits<float>::infinity();
  alignas(64) float lse_b[kBR], delta[kBR];
  {
    const int64_t bh = b * pl.Hq + h, hk = h / pl.groups();
    const int64_t slot = ws.slot(b * pl.Hkv + hk);
    const PT* kn = static_cast<const PT*>(ws.kn) + slot * pl.Lk * Dp;
    const PT* vn = static_cast<const PT*>(ws.vn) + slot * pl.Lk * Dp;
    const PT* ktr = static_cast<const PT*>(ws.kt) + slot * nt * Dp * kBK;
    Buffer<PT>&qs = sc.qs, &qt = sc.qt, &qn = sc.qn, &dos = sc.dos, &dot = sc.dot, &don = sc.don,
    &os = sc.os, &pn = sc.pn, &dsn = sc.dsn, &dsv = sc.dsv;
    Buffer<float>&s = sc.s, &dp = sc.dp, &dqt = sc.dqt, &tmp = sc.tmp;
    float* dcap = pl.softcap > 0.0f ? sc.cap.data : nullptr;  // the cap's derivative per score
    for (int64_t rb = 0; rb < pl.nrb; ++rb) {
      const int64_t i0 = rb * kBR, rows = std::min(kBR, pl.L - i0);
      stage_rows<TIn, PT>(pl, q, b, h, i0, rows, qs.data);
      stage_rows<TIn, PT>(pl, dout, b, h, i0, rows, dos.data);
      stage_rows<TIn, PT>(pl, out, b, h, i0, rows, os.data);  // for delta = rowsum(dO O)
      pack_t<PT>(pl, qs.data, qt.data);
      pack_t<PT>(pl, dos.data, dot.data);
      const PT* qrows = qs.data;  // K = rows operands: natural rows, or row pairs for bf16
      const PT* dorows = dos.data;
      if constexpr (PAIR == 2) {
        pack_n_bf16(pl, reinterpret_cast<const uint16_t*>(qs.data),
                    reinterpret_cast<uint16_t*>(qn.data));
        pack_n_bf16(pl, reinterpret_cast<const uint16_t*>(dos.data),
                    reinterpret_cast<uint16_t*>(don.data));
        qrows = qn.data;
        dorows = don.data;
      }
      for (int64_t m = 0; m < kBR; ++m) {
        lse_b[m] = inf;  // rows that saw nothing (and padding rows): every P = exp(-inf) = 0
        delta[m] = 0.0f;
        if (m >= rows) continue;
        const float l = lse[bh * pl.L + i0 + m];
        if (l != -inf) lse_b[m] = l;
        const float acc = row_dot(dos.data + m * Dp, os.data + m * Dp, Dp);
        delta[m] = dlse == nullptr ? acc : acc - dlse[bh * pl.L + i0 + m];  // d lse / d s = P
      }
      std::fill(dqt.data, dqt.data + Dp * kBR, 0.0f);
      bool any_tile = false;
      for (const TileRef& ref : pl.row_tiles[rb]) {
        const KeyTile tile = pl.tiles[ref.tile];
        const int64_t kt = tile.end - tile.start, kpad = (kt + PAIR - 1) / PAIR * PAIR;
        bool pad_rows = false;
        if (pl.keep != nullptr) {
          const int32_t kept = pl.kept[b * nt + ref.tile];
          if (kept == 0) continue;
          pad_rows = kept < kt;
        }
        any_tile = true;
        // P^T = exp(scale K Q^T - lse)
        gemm<PT>(kt, kBR, Dp / PAIR, kn + tile.start * Dp, Dp, qt.data, kBR * PAIR, s.data, kBR,
                 false);
        scale_mask_tile(pl, s.data, kt, tile.start, i0, ref.mixed, pad_rows, b, nullptr, dcap);
        for (int64_t n = 0; n < kt; ++n) exp_row<PAIR == 2>(s.data + n * kBR, lse_b, nullptr);
        const PT* pa;
        if constexpr (PAIR == 2) {
          for (int64_t n = 0; n < kt; ++n)
            to_bf16_row(s.data + n * kBR, reinterpret_cast<uint16_t*>(pn.data) + n * kBR, kBR);
          pa = pn.data;
        } else {
          pa = reinterpret_cast<const PT*>(s.data);
        }
        // dV += P^T dO
        gemm<PT>(kt, Dp, kBR / PAIR, pa, kBR, dorows, Dp * PAIR, dv + tile.start * Dp, Dp, true);
        // dP^T = V dO^T, then dS^T = P^T (dP^T - delta)
        gemm<PT>(kt, kBR, Dp / PAIR, vn + tile.start * Dp, Dp, dot.data, kBR * PAIR, dp.data, kBR,
                 false);
        for (int64_t n = 0; n < kt; ++n)
          ds_row(s.data + n * kBR, dp.data + n * kBR, delta,
                 dcap == nullptr ? nullptr : dcap + n * kBR);
        const PT* dsa;
        const PT* dsb;
        if constexpr (PAIR == 2) {
          if (kpad > kt) std::fill(dp.data + kt * kBR, dp.data + kpad * kBR, 0.0f);
          uint16_t* natural = reinterpret_cast<uint16_t*>(dsn.data);
          uint16_t* pairs = reinterpret_cast<uint16_t*>(dsv.data);
          for (int64_t n = 0; n < kt; ++n) to_bf16_row(dp.data + n * kBR, natural + n * kBR, kBR);
          for (int64_t n = 0; n < kt; n += 2)
            to_bf16_pairs(dp.data + n * kBR, dp.data + (n + 1) * kBR, pairs + n * kBR, kBR);
          dsa = dsn.data;
          dsb = dsv.data;
        } else {
          dsa = dsb = reinterpret_cast<const PT*>(dp.data);
        }
        // dK += dS^T Q (scaled at the end); dQ^T += K^T dS^T
        gemm<PT>(kt, Dp, kBR / PAIR, dsa, kBR, qrows, Dp * PAIR, dk + tile.start * Dp, Dp, true);
        gemm<PT>(D, kBR, kpad / PAIR, ktr + ref.tile * Dp * kBK, kBK, dsb, kBR * PAIR, dqt.data,
                 kBR, true);
      }
      for (int64_t m = 0; m < kBR; ++m) delta[m] = any_tile ? pl.scale : 0.0f;
      store_rows_t<TIn>(pl, dqt.data, delta, dq + (bh * pl.L + i0) * D, D, rows, tmp.data);
    }
  }
}

template <typename TIn, typename PT>
void backward_t(const Plan& pl, const Strided& q, const Strided& dout, const Strided& out,
                const float* lse, const float* dlse, const Workspace& ws, TIn* dq, float* dk_acc,
                float* dv_acc,
                int64_t task0, int64_t task1) {
  BackwardScratch<PT> sc(pl.Dp);
  for (int64_t bh = task0; bh < task1; ++bh)
    backward_head<TIn, PT>(pl, q, dout, out, lse, dlse, ws, dq, bh / pl.Hq, bh % pl.Hq,
                           dk_acc + bh * pl.Lk * pl.Dp, dv_acc + bh * pl.Lk * pl.Dp, sc);
}

// dK/dV of one (b, hk) = bh: sum the float32 accumulators of `heads` heads (acc + i Lk Dp,
// i < heads), scale dK, and write both in the input dtype to the current and past outputs
// ([B, Hkv, L, D] and [B, Hkv, P, D], contiguous; the past ones null when not wanted).
template <typename TIn>
void finish_kv_unit(const Plan& pl, const float* dk_acc, const float* dv_acc, int64_t heads,
                    int64_t bh, TIn* dk, TIn* dv, TIn* dpk, TIn* dpv) {
  const int64_t Dp = pl.Dp, D = pl.D, stride = pl.Lk * Dp;
  for (int64_t j = 0; j < pl.Lk; ++j) {
    const bool past = j < pl.P;
    if (past && dpk == nullptr) continue;
    TIn* ok = past ? dpk + (bh * pl.P + j) * D : dk + (bh * pl.L + j - pl.P) * D;
    TIn* ov = past ? dpv + (bh * pl.P + j) * D : dv + (bh * pl.L + j - pl.P) * D;
    for (int64_t d = 0; d < D; ++d) {
      float gk = 0.0f, gv = 0.0f;
      for (int64_t i = 0; i < heads; ++i) {
        gk += dk_acc[i * stride + j * Dp + d];
        gv += dv_acc[i * stride + j * Dp + d];
      }
      ok[d] = from_float<TIn>(gk * pl.scale);
      ov[d] = from_float<TIn>(gv);
    }
  }
}

// (b, hk) in [bh0, bh1) from the per-query-head accumulators [B * Hq][Lk][Dp] of backward_t
template <typename TIn>
void finish_kv_t(const Plan& pl, const float* dk_acc, const float* dv_acc, TIn* dk, TIn* dv,
                 TIn* dpk, TIn* dpv, int64_t bh0, int64_t bh1) {
  const int64_t G = pl.groups();
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t first = (bh / pl.Hkv * pl.Hq + bh % pl.Hkv * G) * pl.Lk * pl.Dp;
    finish_kv_unit<TIn>(pl, dk_acc + first, dv_acc + first, G, bh, dk, dv, dpk, dpv);
  }
}

// A unit is one (batch, kv head) bh = b * Hkv + hk with its group of query heads: it packs its
// keys/values right before its row tasks use them (still in L2), and in the backward pass sums
// the group's key/value gradients in one local accumulator. Used when there are enough units
// to keep every thread busy.
template <typename TIn, typename PT>
void forward_units_t(const Plan& pl, const Strided& q, const Strided& k, const Strided& v,
                     const Strided& pk, const Strided& pv, TIn* out, float* lse, int64_t u0,
                     int64_t u1) {
  Buffer<PT> kn(kUnitKn, pl.Lk * pl.Dp), vt(kUnitVt, pl.ntiles() * pl.Dp * kBK);
  Workspace ws;
  ws.single = true;
  ws.kn = kn.data;
  ws.vt = vt.data;
  const int64_t G = pl.groups();
  for (int64_t u = u0; u < u1; ++u) {
    pack_kv_t<TIn, PT>(pl, k, v, pk, pv, ws, u, u + 1);
    const int64_t first_head = u / pl.Hkv * pl.Hq + u % pl.Hkv * G;
    forward_t<TIn, PT>(pl, q, ws, out, lse, first_head * pl.nrb, (first_head + G) * pl.nrb);
  }
}

// ------------------------------------------------------------------------- few query rows

// float copy of an input row of D elements read with element stride s3
template <typename TIn>
inline void row_to_float(const TIn* src, int64_t s3, float* dst, int64_t D) {
  if (s3 == 1) {
    for (int64_t d = 0; d < D; ++d) dst[d] = to_float(src[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = to_float(src[d * s3]);
  }
}

#if RMT_MA_ISA >= 1
// (load16: the lanes of m of 16 elements as floats, avx512_math.h)

// lane j of the result = the sum of the 16 lanes of v[j] (a transposing add tree: 45
// shuffles/adds for 16 sums instead of 16 horizontal reductions)
inline __m512 sum16x16(const __m512* v) {
  __m512 r[8], t[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: a0+a2, b0+b2, a1+a3, b1+b3
    r[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of v[4i .. 4i + 3]
    const __m512d a = _mm512_castps_pd(r[2 * i]), b = _mm512_castps_pd(r[2 * i + 1]);
    t[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], 0x88),
                                  _mm512_shuffle_f32x4(t[0], t[1], 0xdd));
  const __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(t[2], t[3], 0x88),
                                  _mm512_shuffle_f32x4(t[2], t[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xdd));
}
#endif

// s[j] = sum_d a[d] x[j][d] for j < n (s[j] = 0 for n <= j < 16), d < D; x rows float or bf16
template <typename RT>
inline void dot16(const float* a, const RT* const* x, int64_t n, int64_t D, float* s) {
#if RMT_MA_ISA >= 1
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = head_mask16(D - d);
    const __m512 av = _mm512_maskz_loadu_ps(m, a + d);
    for (int64_t j = 0; j < n; ++j) acc[j] = _mm512_fmadd_ps(av, load16(x[j] + d, m), acc[j]);
  }
  _mm512_storeu_ps(s, sum16x16(acc));
#else
  for (int64_t j = 0; j < 16; ++j) {
    float acc = 0.0f;
    if (j < n) {
      const RT* xj = x[j];
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < D; ++d) acc += a[d] * to_float(xj[d]);
    }
    s[j] = acc;
  }
#endif
}

// a[d] = alpha * a[d] + sum_j p[j] x[j][d] over d < D, j < n (a = sum_j p[j] x[j] when first:
// a is not read), the accumulator held in registers across the n rows; x rows float or bf16
template <typename RT>
inline void pv16(const float* p, const RT* const* x, int64_t n, float* a, float alpha, bool first,
                 int64_t D) {
#if RMT_MA_ISA >= 1
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = head_mask16(D - d);
    __m512 acc = first ? _mm512_setzero_ps()
                       : _mm512_mul_ps(_mm512_set1_ps(alpha), _mm512_maskz_loadu_ps(m, a + d));
    for (int64_t j = 0; j < n; ++j)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), load16(x[j] + d, m), acc);
    _mm512_mask_storeu_ps(a + d, m, acc);
  }
#else
  if (first) std::fill(a, a + D, 0.0f);
  const float keep = first ? 0.0f : alpha;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) a[d] *= keep;
  for (int64_t j = 0; j < n; ++j) {
    const RT* xj = x[j];
    const float pj = p[j];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) a[d] += pj * to_float(xj[d]);
  }
#endif
}

// s[j] = c tanh(s[j] / c) for j < 16 (the soft-cap of scale_mask_tile_t)
inline void softcap16(float* s, float c) {
#if RMT_MA_ISA >= 1
  const __m512 t = tanh512(_mm512_mul_ps(_mm512_loadu_ps(s), _mm512_set1_ps(1.0f / c)));
  _mm512_storeu_ps(s, _mm512_mul_ps(t, _mm512_set1_ps(c)));
#else
  const float inv = 1.0f / c;
  for (int j = 0; j < 16; ++j) s[j] = c * std::tanh(s[j] * inv);
#endif
}

// s[j] = seen bit j ? s[j] : -inf, then p[j] = exp(s[j] - max) in place, j < 16; returns the
// max (-inf when nothing is seen: s is left as is)
inline float mask_max16(float* s, uint32_t seen) {
  const float ninf = -std::numeric_limits<float>::infinity();
#if RMT_MA_ISA >= 1
  const __m512 v = _mm512_mask_blend_ps(static_cast<__mmask16>(seen), _mm512_set1_ps(ninf),
                                        _mm512_loadu_ps(s));
  _mm512_storeu_ps(s, v);
  return _mm512_reduce_max_ps(v);
#else
  float mx = ninf;
#pragma omp simd reduction(max : mx)
  for (int j = 0; j < 16; ++j) {
    s[j] = (seen >> j) & 1u ? s[j] : ninf;
    mx = std::max(mx, s[j]);
  }
  return mx;
#endif
}

// p[j] = exp(s[j] - sub) for j < 16 (s[j] = -inf gives 0); returns their sum
inline float exp_chunk16(float* s, float sub) {
#if RMT_MA_ISA >= 1
  const __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(s), _mm512_set1_ps(sub)));
  _mm512_storeu_ps(s, p);
  return _mm512_reduce_add_ps(p);
#else
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < 16; ++j) {
    s[j] = exp_or_zero(s[j] - sub);
    sum += s[j];
  }
  return sum;
#endif
}

// bit j set: key j0 + j (j < n) lies in [lo, hi)
inline uint32_t interval_bits(int64_t j0, int64_t n, int64_t lo, int64_t hi) {
  const int64_t a = std::max<int64_t>(lo - j0, 0), b = std::min<int64_t>(hi - j0, n);
  return a < b ? ((b - a >= 32 ? ~0u : ((1u << (b - a)) - 1u)) << a) : 0u;
}

// Forward pass of units [u0, u1) (u = b * Hkv + hk) when the query rows are few (decoding one
// token, a segment's write rows): every query row of the unit's G heads reads the keys and values
// straight from their buffers, 16 keys at a time (scores, online softmax and the value sum in
// float32), so nothing is packed and no tile column is padding. Same out/lse as forward_t (the
// probabilities stay float32 rather than being rounded to bf16 for a product).
template <typename TIn>
void forward_rows_t(const Plan& pl, const Strided& q, const Strided& k, const Strided& v,
                    const Strided& pk, const Strided& pv, TIn* out, float* lse, int64_t u0,
                    int64_t u1) {
  constexpr int64_t C = 16;  // keys per chunk
  const int64_t D = pl.D, G = pl.groups(), L = pl.L, R = G * L;
  const int64_t Dr = (D + 15) / 16 * 16;  // row stride of the float buffers
  const float ninf = -std::numeric_limits<float>::infinity();
  Buffer<float> qf(kRowsQ, R * Dr), acc(kRowsAcc, R * Dr), kf(kRowsK, C * Dr), vf(kRowsV, C * Dr);
  Buffer<float> stat(kRowsStat, 2 * R + C);
  float *mrow = stat.data, *lrow = stat.data + R, *sc = stat.data + 2 * R;
  // key and value rows read in place when every buffer's rows are contiguous, else as floats
  const bool direct = k.s3 == 1 && v.s3 == 1 && (pl.P == 0 || (pk.s3 == 1 && pv.s3 == 1));
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t b = u / pl.Hkv, hk = u % pl.Hkv, h0 = hk * G;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < L; ++i) {
        float* row = qf.data + (g * L + i) * Dr;
        row_to_float(at4<TIn>(q, b, h0 + g, i), q.s3, row, D);
        for (int64_t d = 0; d < D; ++d) row[d] *= pl.scale;
      }
    std::fill(mrow, mrow + R, ninf);
    std::fill(lrow, lrow + R, 0.0f);
    for (int64_t j0 = 0; j0 < pl.Lk; j0 += C) {
      const int64_t n = std::min(C, pl.Lk - j0);
      uint32_t kept = 0;
      for (int64_t jj = 0; jj < n; ++jj)
        if (pl.keep == nullptr || key_kept(pl, b, j0 + jj)) kept |= 1u << jj;
      if (kept == 0) continue;
      // the chunk's key and value rows: in place (kin, vin) or as floats (kcp, vcp)
      const TIn* kin[C];
      const TIn* vin[C];
      const float* kcp[C];
      const float* vcp[C];
      for (int64_t jj = 0; jj < n; ++jj) {
        const int64_t j = j0 + jj;
        const bool past = j < pl.P;
        const Strided& ks = past ? pk : k;
        const Strided& vs = past ? pv : v;
        kin[jj] = at4<TIn>(ks, b, hk, past ? j : j - pl.P);
        vin[jj] = at4<TIn>(vs, b, hk, past ? j : j - pl.P);
        if (!direct) {
          row_to_float(kin[jj], ks.s3, kf.data + jj * Dr, D);
          row_to_float(vin[jj], vs.s3, vf.data + jj * Dr, D);
          kcp[jj] = kf.data + jj * Dr;
          vcp[jj] = vf.data + jj * Dr;
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = r % L;
        const uint32_t seen = kept & (interval_bits(j0, n, pl.lo0[i], pl.hi0[i]) |
                                      interval_bits(j0, n, pl.lo1[i], pl.hi1[i]));
        if (seen == 0) continue;  // nothing seen in this chunk
        if (direct) {
          dot16(qf.data + r * Dr, kin, n, D, sc);
        } else {
          dot16(qf.data + r * Dr, kcp, n, D, sc);
        }
        if (pl.softcap > 0.0f) softcap16(sc, pl.softcap);
        const float mx = mask_max16(sc, seen);
        const bool first = mrow[r] == ninf;
        const float mnew = std::max(mrow[r], mx);
        const float alpha = first ? 0.0f : exp_or_zero(mrow[r] - mnew);
        mrow[r] = mnew;
        lrow[r] = lrow[r] * alpha + exp_chunk16(sc, mnew);
        if (direct) {
          pv16(sc, vin, n, acc.data + r * Dr, alpha, first, D);
        } else {
          pv16(sc, vcp, n, acc.data + r * Dr, alpha, first, D);
        }
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t g = r / L, i = r % L, bh = b * pl.Hq + h0 + g;
      TIn* dst = out + out_offset(pl, b, h0 + g, i);
      const bool any = lrow[r] > 0.0f;
      if (any) {
        store_row<TIn>(acc.data + r * Dr, 1.0f / lrow[r], dst, D);
      } else {
        std::fill(dst, dst + D, from_float<TIn>(0.0f));
      }
      lse[bh * L + i] = any ? mrow[r] + std::log(lrow[r]) : ninf;
    }
  }
}

template <typename TIn, typename PT>
void backward_units_t(const Plan& pl, const Strided& q, const Strided& k, const Strided& v,
                      const Strided& pk, const Strided& pv, const Strided& dout,
                      const Strided& out, const float* lse, const float* dlse, TIn* dq, TIn* dk,
                      TIn* dv, TIn* dpk, TIn* dpv, int64_t u0, int64_t u1) {
  Buffer<PT> kn(kUnitKn, pl.Lk * pl.Dp), vn(kUnitVn, pl.Lk * pl.Dp),
      kt(kUnitKt, pl.ntiles() * pl.Dp * kBK);
  Buffer<float> dk_acc(kUnitDk, pl.Lk * pl.Dp), dv_acc(kUnitDv, pl.Lk * pl.Dp);
  BackwardScratch<PT> sc(pl.Dp);
  Workspace ws;
  ws.single = true;
  ws.kn = kn.data;
  ws.vn = vn.data;
  ws.kt = kt.data;
  const int64_t G = pl.groups();
  for (int64_t u = u0; u < u1; ++u) {
    pack_kv_t<TIn, PT>(pl, k, v, pk, pv, ws, u, u + 1);
    std::fill(dk_acc.data, dk_acc.data + pl.Lk * pl.Dp, 0.0f);
    std::fill(dv_acc.data, dv_acc.data + pl.Lk * pl.Dp, 0.0f);
    const int64_t b = u / pl.Hkv, hk = u % pl.Hkv;
    for (int64_t g = 0; g < G; ++g)
      backward_head<TIn, PT>(pl, q, dout, out, lse, dlse, ws, dq, b, hk * G + g, dk_acc.data,
                             dv_acc.data, sc);
    finish_kv_unit<TIn>(pl, dk_acc.data, dv_acc.data, 1, u, dk, dv, dpk, dpv);
  }
}

// --------------------------------------------------------------- entry points (type dispatch)

// bf16 inputs use bf16 products where the ISA has them, float32 products otherwise
#if RMT_MA_ISA >= 2
using Bf16Packed = uint16_t;
#else
using Bf16Packed = float;
#endif

inline int64_t packed_bytes(bool bf16) { return bf16 ? sizeof(Bf16Packed) : sizeof(float); }

inline void pack_kv(const Plan& pl, const Strided& k, const Strided& v, const Strided& pk,
                    const Strided& pv, const Workspace& ws, int64_t bh0, int64_t bh1) {
  if (pl.bf16) {
    pack_kv_t<uint16_t, Bf16Packed>(pl, k, v, pk, pv, ws, bh0, bh1);
  } else {
    pack_kv_t<float, float>(pl, k, v, pk, pv, ws, bh0, bh1);
  }
}

inline void forward(const Plan& pl, const Strided& q, const Workspace& ws, void* out, float* lse,
                    int64_t task0, int64_t task1) {
  const TileScope tiles(pl.bf16);
  if (pl.bf16) {
    forward_t<uint16_t, Bf16Packed>(pl, q, ws, static_cast<uint16_t*>(out), lse, task0, task1);
  } else {
    forward_t<float, float>(pl, q, ws, static_cast<float*>(out), lse, task0, task1);
  }
}

inline void backward(const Plan& pl, const Strided& q, const Strided& dout, const Strided& out,
                     const float* lse, const float* dlse, const Workspace& ws, void* dq,
                     float* dk_acc, float* dv_acc, int64_t task0, int64_t task1) {
  const TileScope tiles(pl.bf16);
  if (pl.bf16) {
    backward_t<uint16_t, Bf16Packed>(pl, q, dout, out, lse, dlse, ws, static_cast<uint16_t*>(dq),
                                     dk_acc, dv_acc, task0, task1);
  } else {
    backward_t<float, float>(pl, q, dout, out, lse, dlse, ws, static_cast<float*>(dq), dk_acc,
                             dv_acc, task0, task1);
  }
}

inline void finish_kv(const Plan& pl, const float* dk_acc, const float* dv_acc, void* dk,
                      void* dv, void* dpk, void* dpv, int64_t bh0, int64_t bh1) {
  if (pl.bf16) {
    finish_kv_t<uint16_t>(pl, dk_acc, dv_acc, static_cast<uint16_t*>(dk),
                          static_cast<uint16_t*>(dv), static_cast<uint16_t*>(dpk),
                          static_cast<uint16_t*>(dpv), bh0, bh1);
  } else {
    finish_kv_t<float>(pl, dk_acc, dv_acc, static_cast<float*>(dk), static_cast<float*>(dv),
                       static_cast<float*>(dpk), static_cast<float*>(dpv), bh0, bh1);
  }
}

inline void forward_units(const Plan& pl, const Strided& q, const Strided& k, const Strided& v,
                          const Strided& pk, const Strided& pv, void* out, float* lse, int64_t u0,
                          int64_t u1) {
  const TileScope tiles(pl.bf16);
  if (pl.bf16) {
    forward_units_t<uint16_t, Bf16Packed>(pl, q, k, v, pk, pv, static_cast<uint16_t*>(out), lse,
                                          u0, u1);
  } else {
    forward_units_t<float, float>(pl, q, k, v, pk, pv, static_cast<float*>(out), lse, u0, u1);
  }
}

inline void forward_rows(const Plan& pl, const Strided& q, const Strided& k, const Strided& v,
                         const Strided& pk, const Strided& pv, void* out, float* lse, int64_t u0,
                         int64_t u1) {
  if (pl.bf16) {
    forward_rows_t<uint16_t>(pl, q, k, v, pk, pv, static_cast<uint16_t*>(out), lse, u0, u1);
  } else {
    forward_rows_t<float>(pl, q, k, v, pk, pv, static_cast<float*>(out), lse, u0, u1);
  }
}

inline void backward_units(const Plan& pl, const Strided& q, const Strided& k, const Strided& v,
                           const Strided& pk, const Strided& pv, const Strided& dout,
                           const Strided& out, const float* lse, const float* dlse, void* dq,
                           void* dk, void* dv, void* dpk, void* dpv, int64_t u0, int64_t u1) {
  const TileScope tiles(pl.bf16);
  if (pl.bf16) {
    using T = uint16_t;
    backward_units_t<T, Bf16Packed>(pl, q, k, v, pk, pv, dout, out, lse, dlse, static_cast<T*>(dq),
                                    static_cast<T*>(dk), static_cast<T*>(dv),
                                    static_cast<T*>(dpk), static_cast<T*>(dpv), u0, u1);
  } else {
    using T = float;
    backward_units_t<T, float>(pl, q, k, v, pk, pv, dout, out, lse, dlse, static_cast<T*>(dq),
                               static_cast<T*>(dk), static_cast<T*>(dv), static_cast<T*>(dpk),
                               static_cast<T*>(dpv), u0, u1);
  }
}
