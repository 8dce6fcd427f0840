// Plain-C++ description of one memory-attention call on CPU, shared by the ATen-facing code
// (memory_attention_cpu.cpp) and the per-instruction-set kernels (memory_attention_cpu_impl.h).
//
// Layout (rmt_fast/masks.py): queries are L rows [read R | segment | write W]; keys are the
// concatenation [past P | current L] ("concatenated key index" j in [0, P + L)), though past and
// current keys live in their own input buffers and are only packed side by side in a workspace.
// Every query row sees at most two intervals of concatenated keys (past keys join the first one),
// which is what makes both block skipping and the per-element mask of a mixed tile cheap.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace rmt_fast {
namespace ma {

// query rows per row block (columns of every transposed score tile) and keys per key tile.
// 32, not 64: an RMT segment is S + 2M rows (288 at S 256, M 16), and finer tiles waste fewer
// padded rows and masked causal pairs; one thread on an AMD EPYC with AVX-512 BF16 (2026-12-05,
// python -m rmt_fast.bench.cpu_attention, thread CPU time, 32 vs 64): 1.06-1.17x faster at
// L 288 (batch 1-32, every mask, forward and backward), 1.03-1.06x at L 544, 0.96-0.98x at L 1056.
constexpr int64_t kBR = 32;
constexpr int64_t kBK = 32;

enum MaskMode : int { kCausal = 0, kRmt = 1, kFull = 2, kBottleneck = 3 };

// An input tensor [B, H, T, D] read through its element strides (any strides).
struct Strided {
  const void* ptr = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
};

struct KeyTile {
  int64_t start, end;  // concatenated key indices [start, end); never straddles past/current
};

struct TileRef {
  int32_t tile;
  bool mixed;  // some (query, key) pairs of the tile are hidden: apply the element mask
};

// Everything about a call that does not depend on the batch/head (plus the padding mask).
struct Plan {
  int64_t B = 0, Hq = 0, Hkv = 0, L = 0, P = 0, Lk = 0, D = 0, Dp = 0;
  int64_t nrb = 0;  // row blocks of kBR query rows
  float scale = 1.0f;
  float softcap = 0.0f;  // > 0: scaled scores x become softcap tanh(x / softcap) (Gemma 2)
  bool bf16 = false;  // inputs are bfloat16 (else float32)
  std::vector<KeyTile> tiles;
  // per query row (padded to nrb * kBR; padding rows see nothing): visible concatenated keys are
  // [lo0, hi0) and [lo1, hi1)
  std::vector<int32_t> lo0, hi0, lo1, hi1;
  std::vector<std::vector<TileRef>> row_tiles;  // per row block: the tiles it must visit
  // key padding (True = real key), [B, P + L] with element strides; null when absent
  const bool* keep = nullptr;
  int64_t keep_s0 = 0, keep_s1 = 0;
  std::vector<int32_t> kept;  // [B][tiles]: real keys per tile (only with keep)

  int64_t ntiles() const { return static_cast<int64_t>(tiles.size()); }
  int64_t groups() const { return Hq / Hkv; }
};

// Packed keys/values of every (batch, kv head) ("slot" bh = b * Hkv + hk), written by pack_kv
// and read by the row tasks, or of one (batch, kv head) at a time (single: every bh uses slot
// 0). PT is the packed element type (float, or bf16 bits as uint16_t); all arrays zero padded.
struct Workspace {
  bool single = false;
  void* kn = nullptr;  // [B*Hkv][Lk][Dp]           keys, row-major (A operand of K Q^T)
  void* vn = nullptr;  // [B*Hkv][Lk][Dp]           values, row-major (backward: V dO^T)
  void* vt = nullptr;  // [B*Hkv][tiles][Dp][kBK]   values transposed per tile (forward: V^T P^T)
  void* kt = nullptr;  // [B*Hkv][tiles][Dp][kBK]   keys transposed per tile (backward: K^T dS^T)

  int64_t slot(int64_t bh) const { return single ? 0 : bh; }
};

// Visible concatenated-key intervals of query row i (the table in rmt_fast/masks.py); a
// sliding window (> 0; 0: none) moves both starts to P + i - window + 1 at least.
inline void row_intervals(int64_t i, int64_t L, int64_t P, int64_t R, int64_t W, int mode,
                          bool past_visible_to_read, int64_t window, int32_t* lo0, int32_t* hi0,
                          int32_t* lo1, int32_t* hi1) {
  int64_t a0 = 0, b0 = 0, a1 = 0, b1 = 0;  // current-key intervals
  const bool read = i < R, write = i >= L - W;
  switch (mode) {
    case kCausal: b0 = i + 1; break;
    case kFull: b0 = L; break;
    case kRmt: b0 = read ? R : (write ? L : i + 1); break;
    default:  // bottleneck
      if (read || write) {
        b0 = L;
      } else {
        b0 = R;
        a1 = L - W;
        b1 = L;
      }
  }
  const bool past = P > 0 && i >= (past_visible_to_read ? 0 : R);
  // every first interval starts at key 0 (or at the window's first key)
  const int64_t first = window > 0 ? std::max<int64_t>(P + i - window + 1, 0) : 0;
  *lo0 = static_cast<int32_t>(std::max(past ? 0 : P + a0, first));
  *hi0 = static_cast<int32_t>(P + b0);
  *lo1 = static_cast<int32_t>(std::max(P + a1, first));  // lo1 >= hi1: no second interval
  *hi1 = static_cast<int32_t>(a1 < b1 ? P + b1 : P + a1);
}

}  // namespace ma
}  // namespace rmt_fast
