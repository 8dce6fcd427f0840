// rmt_fast::memory_attention_cpu: fused memory attention on CPU (float32 and bfloat16), forward
// (out + float32 log-sum-exp) and backward (dq, dk, dv and the past keys' dk, dv), every mask of
// rmt_fast/masks.py, grouped-query attention, past keys/values in their own buffers, key
// padding, inputs of any strides. The kernels are in memory_attention_cpu_impl.h, compiled here
// five times (portable C++, AVX2 + FMA, AVX-512F, AVX-512 BF16, AMX-BF16) and picked at run time
// from the CPU's features, so the extension is built without -march and still runs anywhere. A
// forward pass with few query rows (decoding) reads keys in place (forward_rows_t, rows_max).
//
// Ops (autograd and fake kernels are registered from rmt_fast/ops/memory_attention/cpu_kernel.py):
//   memory_attention_cpu(q [B,Hq,L,D], k, v [B,Hkv,L,D], past_k?, past_v? [B,Hkv,P,D],
//       key_padding_mask? [B,P+L] bool, num_read, num_write, mask, past_visible_to_read, scale,
//       window=0, softcap=0.0) (window > 0: a sliding window of that many keys; softcap > 0:
//       scaled scores x become softcap * tanh(x / softcap) before the mask; rmt_fast/masks.py)
//       -> (out [B,Hq,L,D] in q's dtype, lse [B,Hq,L] float32; -inf and zeros on empty rows);
//       out lies in memory as [B,L,Hq,D] (a permuted view): out.transpose(1, 2), what an
//       attention layer takes next, is contiguous without a copy
//   memory_attention_cpu_backward(dout, q, k, v, past_k?, past_v?, key_padding_mask?, out, lse,
//       grad_lse?, ..., need_past_grad, window=0, softcap=0.0) -> [dq, dk, dv] (+ [dpast_k,
//       dpast_v] when need_past_grad); grad_lse [B,Hq,L] float32 is the gradient reaching the
//       lse output
//   memory_attention_cpu_isa(dtype=None) -> str: "amx", "avx512_bf16", "avx512", "avx2" or
//       "generic",
//       the code path that calls with inputs of that dtype (None: float32) take now
//       (RMT_FAST_CPU_ISA=generic|avx2|avx512|avx512_bf16|amx caps it, for tests; attention_isa)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>


#include "activation_math.h"
#include "cpu_isa.h"
#include "memory_attention_cpu.h"

namespace rmt_fast {
namespace ma {

namespace generic {
#define RMT_MA_ISA 0
#include "memory_attention_cpu_impl.h"
#undef RMT_MA_ISA
}  // namespace generic

#ifdef RMT_CPU_X86
// The portable code compiled for AVX2 + FMA (CPUs without AVX-512: AMD Zen 1-3, Intel's server
// cores before Skylake-SP and most of its client cores): the products on ukernel's 8-lane
// microkernel (RMT_MA_AVX2), the element loops vectorised by the compiler (`omp simd`)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define RMT_MA_ISA 0
#define RMT_MA_AVX2 1
#include "memory_attention_cpu_impl.h"
#undef RMT_MA_AVX2
#undef RMT_MA_ISA
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,prefer-vector-width=512")
namespace avx512 {
#define RMT_MA_ISA 1
#define RMT_CPU_ISA 1
#include "avx512_math.h"
#undef RMT_CPU_ISA
#include "memory_attention_cpu_impl.h"
#undef RMT_MA_ISA
}  // namespace avx512
#pragma GCC pop_options

#ifdef RMT_CPU_BF16
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,prefer-vector-width=512")
namespace avx512bf16 {
#define RMT_MA_ISA 2
#define RMT_CPU_ISA 2
#include "avx512_math.h"
#undef RMT_CPU_ISA
#include "memory_attention_cpu_impl.h"
#undef RMT_MA_ISA
}  // namespace avx512bf16
#pragma GCC pop_options
#endif

#ifdef RMT_CPU_AMX
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,fma," \
                   "prefer-vector-width=512")
namespace amx {
#define RMT_MA_ISA 3
#define RMT_CPU_ISA 2
#include "avx512_math.h"
#undef RMT_CPU_ISA
#include "memory_attention_cpu_impl.h"
#undef RMT_MA_ISA
}  // namespace amx
#pragma GCC pop_options
#endif
#endif

namespace {

struct Kernels {
  int64_t (*packed_bytes)(bool);
  void (*pack_kv)(const Plan&, const Strided&, const Strided&, const Strided&, const Strided&,
                  const Workspace&, int64_t, int64_t);
  void (*forward)(const Plan&, const Strided&, const Workspace&, void*, float*, int64_t, int64_t);
  void (*backward)(const Plan&, const Strided&, const Strided&, const Strided&, const float*,
                   const float*, const Workspace&, void*, float*, float*, int64_t, int64_t);
  void (*finish_kv)(const Plan&, const float*, const float*, void*, void*, void*, void*, int64_t,
                    int64_t);
  void (*forward_units)(const Plan&, const Strided&, const Strided&, const Strided&,
                        const Strided&, const Strided&, void*, float*, int64_t, int64_t);
  void (*forward_rows)(const Plan&, const Strided&, const Strided&, const Strided&,
                       const Strided&, const Strided&, void*, float*, int64_t, int64_t);
  void (*backward_units)(const Plan&, const Strided&, const Strided&, const Strided&,
                         const Strided&, const Strided&, const Strided&, const Strided&,
                         const float*, const float*, void*, void*, void*, void*, void*, int64_t,
                         int64_t);
};

#define RMT_MA_KERNELS(ns)                                                                \
  Kernels {                                                                               \
    &ns::packed_bytes, &ns::pack_kv, &ns::forward, &ns::backward, &ns::finish_kv,         \
        &ns::forward_units, &ns::forward_rows, &ns::backward_units                        \
  }

Kernels kernels_for(int isa) {
#ifdef RMT_CPU_X86
#ifdef RMT_CPU_AMX
  if (isa == kAmx) return RMT_MA_KERNELS(amx);
#endif
#ifdef RMT_CPU_BF16
  if (isa >= kAvx512Bf16) return RMT_MA_KERNELS(avx512bf16);
#endif
  if (isa == kAvx512) return RMT_MA_KERNELS(avx512);
  if (isa == kAvx2) return RMT_MA_KERNELS(avx2);
#endif
  (void)isa;
  return RMT_MA_KERNELS(generic);
}

int parse_mask(const std::string& mask) {
  if (mask == "causal") return kCausal;
  if (mask == "rmt") return kRmt;
  if (mask == "full") return kFull;
  if (mask == "bottleneck") return kBottleneck;
  TORCH_CHECK(false, "memory_attention_cpu: mask must be one of causal, rmt, full, bottleneck, "
              "got '", mask, "'");
}

// The attention kernels' path for inputs of this dtype: active_cpu_isa(), except that float32
// inputs never take AMX (tiles multiply bf16) and bf16 inputs on CPUs with AMX-BF16 hardware
// that this process may not use take the AVX-512F path (float32 FMAs) unless RMT_FAST_CPU_ISA
// names one: on an Intel Xeon with AMX that path ran our bf16 attention 1.4-1.7x faster than
// _mm512_dpbf16_ps, where an AMD Zen 5 ran it ~1.5x slower (bench/README.md, "On an AMX CPU").
int attention_isa(bool bf16) {
  const int isa = active_cpu_isa();
  if (!bf16) return std::min(isa, int(kAvx512Bf16));
  if (isa == kAvx512Bf16 && cpu_isa_env() == nullptr && cpu_has_amx_bf16()) return kAvx512;
  return isa;
}

Strided strided(const at::Tensor& t) {
  Strided s;
  if (!t.defined()) return s;
  s.ptr = t.const_data_ptr();
  s.s0 = t.stride(0);
  s.s1 = t.stride(1);
  s.s2 = t.stride(2);
  s.s3 = t.stride(3);
  return s;
}

void check_like(const char* name, const at::Tensor& t, const at::Tensor& q,
                std::vector<int64_t> shape) {
  TORCH_CHECK(t.dim() == 4 && t.sizes().vec() == shape, "memory_attention_cpu: ", name,
              " must have shape ", at::IntArrayRef(shape), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "memory_attention_cpu: ", name,
              " must have q's dtype ", q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "memory_attention_cpu: ", name, " must be a CPU tensor, got ",
              t.device());
}

// Validate the inputs and describe the call (visible key intervals, tiles, skipped blocks).
Plan make_plan(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const std::optional<at::Tensor>& past_k, const std::optional<at::Tensor>& past_v,
               const std::optional<at::Tensor>& key_padding_mask, int64_t num_read,
               int64_t num_write, const std::string& mask, bool past_visible_to_read,
               double scale, int64_t window, double softcap) {
  TORCH_CHECK(q.dim() == 4, "memory_attention_cpu: q must be 4-D [B, Hq, L, D], got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "memory_attention_cpu: q must be float32 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.device().is_cpu(), "memory_attention_cpu: q must be a CPU tensor, got ",
              q.device());
  Plan pl;
  pl.B = q.size(0);
  pl.Hq = q.size(1);
  pl.L = q.size(2);
  pl.D = q.size(3);
  TORCH_CHECK(k.dim() == 4, "memory_attention_cpu: k must be 4-D [B, Hkv, L, D], got ", k.sizes());
  pl.Hkv = k.size(1);
  TORCH_CHECK(pl.Hkv > 0 && pl.Hq % pl.Hkv == 0, "memory_attention_cpu: query heads (", pl.Hq,
              ") must be a multiple of key/value heads (", pl.Hkv, ")");
  check_like("k", k, q, {pl.B, pl.Hkv, pl.L, pl.D});
  check_like("v", v, q, {pl.B, pl.Hkv, pl.L, pl.D});
  const bool has_pk = past_k.has_value() && past_k->defined();
  const bool has_pv = past_v.has_value() && past_v->defined();
  TORCH_CHECK(has_pk == has_pv, "memory_attention_cpu: past_k and past_v must be given together");
  if (has_pk) {
    TORCH_CHECK(past_k->dim() == 4, "memory_attention_cpu: past_k must be 4-D [B, Hkv, P, D], got ",
                past_k->sizes());
    pl.P = past_k->size(2);
    check_like("past_k", *past_k, q, {pl.B, pl.Hkv, pl.P, pl.D});
    check_like("past_v", *past_v, q, {pl.B, pl.Hkv, pl.P, pl.D});
  }
  pl.Lk = pl.P + pl.L;
  TORCH_CHECK(num_read >= 0 && num_write >= 0 && num_read + num_write <= pl.L,
              "memory_attention_cpu: num_read and num_write must be >= 0 with num_read + "
              "num_write <= L (", pl.L, "), got ", num_read, " and ", num_write);
  TORCH_CHECK(std::isfinite(scale), "memory_attention_cpu: scale must be finite, got ", scale);
  TORCH_CHECK(window >= 0, "memory_attention_cpu: window must be >= 0 (0: none), got ", window);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0,
              "memory_attention_cpu: softcap must be finite and >= 0 (0: none), got ", softcap);
  pl.softcap = static_cast<float>(softcap);
  const int mode = parse_mask(mask);
  pl.scale = static_cast<float>(scale);
  pl.bf16 = q.scalar_type() == at::kBFloat16;
  pl.Dp = (pl.D + 31) / 32 * 32;  // whole 16-word rows for the 32-bit tile transposes
  pl.nrb = (pl.L + kBR - 1) / kBR;
  for (int64_t s = 0; s < pl.P; s += kBK) pl.tiles.push_back({s, std::min(s + kBK, pl.P)});
  for (int64_t s = pl.P; s < pl.Lk; s += kBK) pl.tiles.push_back({s, std::min(s + kBK, pl.Lk)});
  const int64_t padded = pl.nrb * kBR;
  pl.lo0.assign(padded, 0);
  pl.hi0.assign(padded, 0);
  pl.lo1.assign(padded, 0);
  pl.hi1.assign(padded, 0);
  for (int64_t i = 0; i < pl.L; ++i)
    row_intervals(i, pl.L, pl.P, num_read, num_write, mode, past_visible_to_read, window,
                  &pl.lo0[i], &pl.hi0[i], &pl.lo1[i], &pl.hi1[i]);
  pl.row_tiles.resize(pl.nrb);
  for (int64_t rb = 0; rb < pl.nrb; ++rb) {
    const int64_t i0 = rb * kBR, i1 = std::min(i0 + kBR, pl.L);
    for (int64_t t = 0; t < pl.ntiles(); ++t) {
      const int64_t s = pl.tiles[t].start, e = pl.tiles[t].end;
      bool all = true, none = true;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t a0 = pl.lo0[i], b0 = pl.hi0[i], a1 = pl.lo1[i], b1 = pl.hi1[i];
        all = all && ((a0 <= s && e <= b0) || (a1 <= s && e <= b1));
        none = none && !(a0 < b0 && a0 < e && s < b0) && !(a1 < b1 && a1 < e && s < b1);
      }
      if (!none) pl.row_tiles[rb].push_back({static_cast<int32_t>(t), !all});
    }
  }
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const at::Tensor& kpm = *key_padding_mask;
    TORCH_CHECK(kpm.dim() == 2 && kpm.size(0) == pl.B && kpm.size(1) == pl.Lk,
                "memory_attention_cpu: key_padding_mask must be [B, P + L] = [", pl.B, ", ",
                pl.Lk, "], got ", kpm.sizes());
    TORCH_CHECK(kpm.scalar_type() == at::kBool,
                "memory_attention_cpu: key_padding_mask must be bool (True = real token), got ",
                kpm.scalar_type());
    TORCH_CHECK(kpm.device().is_cpu(), "memory_attention_cpu: key_padding_mask must be a CPU "
                "tensor, got ", kpm.device());
    pl.keep = kpm.const_data_ptr<bool>();
    pl.keep_s0 = kpm.stride(0);
    pl.keep_s1 = kpm.stride(1);
    pl.kept.assign(pl.B * pl.ntiles(), 0);
    for (int64_t b = 0; b < pl.B; ++b)
      for (int64_t t = 0; t < pl.ntiles(); ++t)
        for (int64_t j = pl.tiles[t].start; j < pl.tiles[t].end; ++j)
          pl.kept[b * pl.ntiles() + t] += pl.keep[b * pl.keep_s0 + j * pl.keep_s1] ? 1 : 0;
  }
  return pl;
}

at::Tensor bytes(int64_t n) { return at::empty({std::max<int64_t>(n, 1)}, at::kByte); }

// Query rows per head up to which the forward pass reads keys and values in place, row by row
// (forward_rows_t: one decoded token, a few rows over a long past), instead of packing tiles: the
// crossovers measured on an Intel Xeon with AMX for every path (bench/README.md, "Few query
// rows"): 8 rows, bf16 on the AVX-512 BF16 path 12 (its tiles are the slowest), on the AMX path
// 2 (its tiles the fastest). RMT_FAST_CPU_ROWS_MAX=n overrides it (read per call: benchmarks and
// tests switch it).
int64_t rows_max(int isa, bool bf16) {
  const char* env = std::getenv("RMT_FAST_CPU_ROWS_MAX");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long long n = std::strtoll(env, &end, 10);
    TORCH_CHECK(*end == '\0' && n >= 0, "RMT_FAST_CPU_ROWS_MAX must be a non-negative integer, "
                "got '", env, "'");
    return n;
  }
  if (bf16 && isa == kAmx) return 2;
  if (bf16 && isa == kAvx512Bf16) return 12;
  return 8;
}

// One task per (batch, kv head) unit (packing next to its use, see forward_units_t) when the
// units keep every thread busy; otherwise pack everything first and split finer.
bool by_units(const Plan& pl) {
  const int64_t threads = at::get_num_threads();
  return threads == 1 || pl.B * pl.Hkv >= 2 * threads;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> memory_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& past_k, const std::optional<at::Tensor>& past_v,
    const std::optional<at::Tensor>& key_padding_mask, int64_t num_read, int64_t num_write,
    c10::string_view mask, bool past_visible_to_read, double scale, int64_t window,
    double softcap) {
  const Plan pl = make_plan(q, k, v, past_k, past_v, key_padding_mask, num_read, num_write,
                            std::string(mask), past_visible_to_read, scale, window, softcap);
  at::Tensor out = at::empty({pl.B, pl.L, pl.Hq, pl.D}, q.options()).permute({0, 2, 1, 3});
  at::Tensor lse = at::empty({pl.B, pl.Hq, pl.L}, q.options().dtype(at::kFloat));
  if (pl.B * pl.Hq * pl.L == 0) return {out, lse};
  const int isa = attention_isa(pl.bf16);
  const Kernels kern = kernels_for(isa);
  const int64_t pb = kern.packed_bytes(pl.bf16), kv = pl.B * pl.Hkv;
  const Strided sq = strided(q), sk = strided(k), sv = strided(v);
  const Strided spk = strided(past_k.value_or(at::Tensor())),
                spv = strided(past_v.value_or(at::Tensor()));
  float* plse = lse.mutable_data_ptr<float>();
  void* pout = out.data_ptr();
  if (pl.L <= rows_max(isa, pl.bf16)) {
    at::parallel_for(0, kv, 1, [&](int64_t u0, int64_t u1) {
      kern.forward_rows(pl, sq, sk, sv, spk, spv, pout, plse, u0, u1);
    });
    return {out, lse};
  }
  if (by_units(pl)) {
    at::parallel_for(0, kv, 1, [&](int64_t u0, int64_t u1) {
      kern.forward_units(pl, sq, sk, sv, spk, spv, pout, plse, u0, u1);
    });
    return {out, lse};
  }
  at::Tensor kn = bytes(kv * pl.Lk * pl.Dp * pb), vt = bytes(kv * pl.ntiles() * pl.Dp * kBK * pb);
  Workspace ws;
  ws.kn = kn.data_ptr();
  ws.vt = vt.data_ptr();
  at::parallel_for(0, kv, 1, [&](int64_t b0, int64_t b1) {
    kern.pack_kv(pl, sk, sv, spk, spv, ws, b0, b1);
  });
  at::parallel_for(0, pl.B * pl.Hq * pl.nrb, 1, [&](int64_t t0, int64_t t1) {
    kern.forward(pl, sq, ws, pout, plse, t0, t1);
  });
  return {out, lse};
}

std::vector<at::Tensor> memory_attention_cpu_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& past_k, const std::optional<at::Tensor>& past_v,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, int64_t num_read,
    int64_t num_write, c10::string_view mask, bool past_visible_to_read, double scale,
    bool need_past_grad, int64_t window, double softcap) {
  const Plan pl = make_plan(q, k, v, past_k, past_v, key_padding_mask, num_read, num_write,
                            std::string(mask), past_visible_to_read, scale, window, softcap);
  const std::vector<int64_t> qshape = {pl.B, pl.Hq, pl.L, pl.D};
  check_like("dout", dout, q, qshape);
  check_like("out", out, q, qshape);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes().vec() ==
              std::vector<int64_t>({pl.B, pl.Hq, pl.L}), "memory_attention_cpu_backward: lse "
              "must be float32 [B, Hq, L] = [", pl.B, ", ", pl.Hq, ", ", pl.L, "], got ",
              lse.scalar_type(), " ", lse.sizes());
  const bool has_dlse = grad_lse.has_value() && grad_lse->defined();
  TORCH_CHECK(!has_dlse || (grad_lse->scalar_type() == at::kFloat && grad_lse->sizes() ==
              lse.sizes()), "memory_attention_cpu_backward: grad_lse must be float32 [B, Hq, L] "
              "like lse, got ", has_dlse ? grad_lse->sizes() : lse.sizes());
  const bool has_past = past_k.has_value() && past_k->defined();
  TORCH_CHECK(!need_past_grad || has_past,
              "memory_attention_cpu_backward: need_past_grad=True needs past_k and past_v");
  at::Tensor dq = at::empty(qshape, q.options());
  at::Tensor dk = at::empty({pl.B, pl.Hkv, pl.L, pl.D}, q.options());
  at::Tensor dv = at::empty({pl.B, pl.Hkv, pl.L, pl.D}, q.options());
  at::Tensor dpk, dpv;
  if (need_past_grad) {
    dpk = at::empty({pl.B, pl.Hkv, pl.P, pl.D}, q.options());
    dpv = at::empty({pl.B, pl.Hkv, pl.P, pl.D}, q.options());
  }
  auto result = [&] {
    std::vector<at::Tensor> r = {dq, dk, dv};
    if (need_past_grad) {
      r.push_back(dpk);
      r.push_back(dpv);
    }
    return r;
  };
  if (pl.B * pl.Hkv * pl.Lk == 0) return result();
  if (pl.L == 0 || pl.Hq == 0) {  // no query: every gradient is zero
    for (at::Tensor* t : {&dk, &dv, &dpk, &dpv})
      if (t->defined()) t->zero_();
    return result();
  }
  const Kernels kern = kernels_for(attention_isa(pl.bf16));
  const int64_t pb = kern.packed_bytes(pl.bf16), kv = pl.B * pl.Hkv;
  const Strided sq = strided(q), sk = strided(k), sv = strided(v), sdo = strided(dout),
                so = strided(out);
  const Strided spk = strided(past_k.value_or(at::Tensor())),
                spv = strided(past_v.value_or(at::Tensor()));
  const at::Tensor lse_c = lse.contiguous();
  const float* plse = lse_c.const_data_ptr<float>();
  const at::Tensor dlse_c = has_dlse ? grad_lse->contiguous() : at::Tensor();
  const float* pdlse = has_dlse ? dlse_c.const_data_ptr<float>() : nullptr;
  void* pdq = dq.data_ptr();
  void* pk = dk.data_ptr();
  void* pv = dv.data_ptr();
  void* ppk = dpk.defined() ? dpk.data_ptr() : nullptr;
  void* ppv = dpv.defined() ? dpv.data_ptr() : nullptr;
  if (by_units(pl)) {
    at::parallel_for(0, kv, 1, [&](int64_t u0, int64_t u1) {
      kern.backward_units(pl, sq, sk, sv, spk, spv, sdo, so, plse, pdlse, pdq, pk, pv, ppk, ppv, u0,
                          u1);
    });
    return result();
  }
  at::Tensor kn = bytes(kv * pl.Lk * pl.Dp * pb), vn = bytes(kv * pl.Lk * pl.Dp * pb),
             ktr = bytes(kv * pl.ntiles() * pl.Dp * kBK * pb);
  Workspace ws;
  ws.kn = kn.data_ptr();
  ws.vn = vn.data_ptr();
  ws.kt = ktr.data_ptr();
  at::parallel_for(0, kv, 1, [&](int64_t b0, int64_t b1) {
    kern.pack_kv(pl, sk, sv, spk, spv, ws, b0, b1);
  });
  at::Tensor dk_acc = at::zeros({pl.B * pl.Hq * pl.Lk * pl.Dp}, q.options().dtype(at::kFloat));
  at::Tensor dv_acc = at::zeros({pl.B * pl.Hq * pl.Lk * pl.Dp}, q.options().dtype(at::kFloat));
  float* pdk = dk_acc.mutable_data_ptr<float>();
  float* pdv = dv_acc.mutable_data_ptr<float>();
  at::parallel_for(0, pl.B * pl.Hq, 1, [&](int64_t t0, int64_t t1) {
    kern.backward(pl, sq, sdo, so, plse, pdlse, ws, pdq, pdk, pdv, t0, t1);
  });
  at::parallel_for(0, kv, 1, [&](int64_t b0, int64_t b1) {
    kern.finish_kv(pl, pdk, pdv, pk, pv, ppk, ppv, b0, b1);
  });
  return result();
}

std::string memory_attention_cpu_isa(std::optional<at::ScalarType> dtype) {
  return kCpuIsaNames[attention_isa(dtype.has_value() && *dtype == at::kBFloat16)];
}

}  // namespace ma
}  // namespace rmt_fast

TORCH_LIBRARY_FRAGMENT(rmt_fast, m) {
  m.def("memory_attention_cpu(Tensor q, Tensor k, Tensor v, Tensor? past_k, Tensor? past_v, "
        "Tensor? key_padding_mask, int num_read, int num_write, str mask, "
        "bool past_visible_to_read, float scale, int window=0, float softcap=0.0) -> "
        "(Tensor, Tensor)");
  m.def("memory_attention_cpu_backward(Tensor dout, Tensor q, Tensor k, Tensor v, "
        "Tensor? past_k, Tensor? past_v, Tensor? key_padding_mask, Tensor out, Tensor lse, "
        "Tensor? grad_lse, int num_read, int num_write, str mask, bool past_visible_to_read, "
        "float scale, bool need_past_grad, int window=0, float softcap=0.0) -> Tensor[]");
  m.def("memory_attention_cpu_isa(ScalarType? dtype=None) -> str",
        &rmt_fast::ma::memory_attention_cpu_isa);
}

TORCH_LIBRARY_IMPL(rmt_fast, CPU, m) {
  m.impl("memory_attention_cpu", &rmt_fast::ma::memory_attention_cpu);
  m.impl("memory_attention_cpu_backward", &rmt_fast::ma::memory_attention_cpu_backward);
}
