// CUDA kernels of rmt_fast._C. Self-contained: includes only segment_index.h and CUDA headers, so
// it compiles with plain nvcc (no torch headers); cuda_ops.cpp binds it to the rmt_fast ops.
//
// assemble / extract are bitwise row copies. Each row is moved in the widest word (16, 8, 4, 2 or
// 1 bytes) that divides the row size and the alignment of every pointer, so the dtype (float32,
// float16, bfloat16, float64; checked by the binding) only enters through the row size in bytes.
#include <cuda_runtime.h>

#include <cstdint>

#include "segment_index.h"
#include "segment_kernels.h"

namespace rmt_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

// Word types by size.
template <int N> struct Word;
template <> struct Word<1> { using type = uint8_t; };
template <> struct Word<2> { using type = uint16_t; };
template <> struct Word<4> { using type = uint32_t; };
template <> struct Word<8> { using type = uint64_t; };
template <> struct Word<16> { using type = uint4; };

template <typename W>
__global__ void assemble_segment_kernel(const W* __restrict__ read_mem, const W* __restrict__ seg,
                                        const W* __restrict__ write_mem, W* __restrict__ out,
                                        int64_t batch, int64_t num_read, int64_t seg_len,
                                        int64_t num_write, int64_t row_words) {
  const int64_t length = num_read + seg_len + num_write;
  const int64_t total = batch * length * row_words;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    int64_t b, row, col;
    unflatten3(i, length, row_words, &b, &row, &col);
    const SourceIndex s = assemble_source(b, row, col, num_read, seg_len, num_write, row_words);
    const W* src = s.part == kReadMemory ? read_mem : (s.part == kSegment ? seg : write_mem);
    out[i] = src[s.offset];
  }
}

template <typename W>
__global__ void extract_memory_kernel(const W* __restrict__ hidden, W* __restrict__ out,
                                      int64_t batch, int64_t length, int64_t start, int64_t count,
                                      int64_t row_words) {
  const int64_t total = batch * count * row_words;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    int64_t b, j, col;
    unflatten3(i, count, row_words, &b, &j, &col);
    out[i] = hidden[extract_source(b, j, col, start, length, row_words)];
  }
}

template <typename W>
__global__ void assemble_mask_kernel(const W* __restrict__ seg_mask, W* __restrict__ out,
                                     int64_t batch, int64_t num_read, int64_t seg_len,
                                     int64_t num_write, W one) {
  const int64_t length = num_read + seg_len + num_write;
  const int64_t total = batch * length;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    int64_t b, row, col;
    unflatten3(i, length, 1, &b, &row, &col);
    const SourceIndex s = assemble_source(b, row, col, num_read, seg_len, num_write, 1);
    out[i] = s.part == kSegment ? seg_mask[s.offset] : one;
  }
}

unsigned int blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// Widest word size dividing row_bytes and the address of every pointer.
int word_bytes(int64_t row_bytes, const void* const* ptrs, int n) {
  for (int w = 16; w > 1; w /= 2) {
    bool ok = row_bytes % w == 0;
    for (int k = 0; k < n && ok; ++k) ok = reinterpret_cast<uintptr_t>(ptrs[k]) % w == 0;
    if (ok) return w;
  }
  return 1;
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <int N>
void assemble_words(const void* r, const void* s, const void* w, void* out, int64_t batch,
                    int64_t mr, int64_t sl, int64_t mw, int64_t row_bytes, cudaStream_t stream) {
  using W = typename Word<N>::type;
  const int64_t row_words = row_bytes / N;
  assemble_segment_kernel<W><<<blocks_for(batch * (mr + sl + mw) * row_words), kThreads, 0,
                               stream>>>(static_cast<const W*>(r), static_cast<const W*>(s),
                                         static_cast<const W*>(w), static_cast<W*>(out), batch,
                                         mr, sl, mw, row_words);
}

template <int N>
void extract_words(const void* h, void* out, int64_t batch, int64_t length, int64_t start,
                   int64_t count, int64_t row_bytes, cudaStream_t stream) {
  using W = typename Word<N>::type;
  const int64_t row_words = row_bytes / N;
  extract_memory_kernel<W><<<blocks_for(batch * count * row_words), kThreads, 0, stream>>>(
      static_cast<const W*>(h), static_cast<W*>(out), batch, length, start, count, row_words);
}

template <int N>
void mask_words(const void* m, void* out, int64_t batch, int64_t mr, int64_t sl, int64_t mw,
                uint64_t one_bits, cudaStream_t stream) {
  using W = typename Word<N>::type;
  const W one = static_cast<W>(one_bits);
  assemble_mask_kernel<W><<<blocks_for(batch * (mr + sl + mw)), kThreads, 0, stream>>>(
      static_cast<const W*>(m), static_cast<W*>(out), batch, mr, sl, mw, one);
}

}  // namespace

const char* launch_assemble_segment(const void* read_mem, const void* seg_emb,
                                    const void* write_mem, void* out, int64_t batch,
                                    int64_t num_read, int64_t seg_len, int64_t num_write,
                                    int64_t row_bytes, CUstream_st* stream) {
  if (batch * (num_read + seg_len + num_write) * row_bytes == 0) return nullptr;
  // Empty inputs (M_r = 0 or M_w = 0) may carry null pointers: they are never read.
  const void* ptrs[4] = {num_read ? read_mem : out, seg_len ? seg_emb : out,
                         num_write ? write_mem : out, out};
  switch (word_bytes(row_bytes, ptrs, 4)) {
    case 16: assemble_words<16>(read_mem, seg_emb, write_mem, out, batch, num_read, seg_len,
                                num_write, row_bytes, stream); break;
    case 8: assemble_words<8>(read_mem, seg_emb, write_mem, out, batch, num_read, seg_len,
                              num_write, row_bytes, stream); break;
    case 4: assemble_words<4>(read_mem, seg_emb, write_mem, out, batch, num_read, seg_len,
                              num_write, row_bytes, stream); break;
    case 2: assemble_words<2>(read_mem, seg_emb, write_mem, out, batch, num_read, seg_len,
                              num_write, row_bytes, stream); break;
    default: assemble_words<1>(read_mem, seg_emb, write_mem, out, batch, num_read, seg_len,
                               num_write, row_bytes, stream); break;
  }
  return last_error();
}

const char* launch_extract_memory(const void* hidden, void* out, int64_t batch, int64_t length,
                                  int64_t start, int64_t count, int64_t row_bytes,
                                  CUstream_st* stream) {
  if (batch * count * row_bytes == 0) return nullptr;
  const void* ptrs[2] = {hidden, out};
  switch (word_bytes(row_bytes, ptrs, 2)) {
    case 16: extract_words<16>(hidden, out, batch, length, start, count, row_bytes, stream); break;
    case 8: extract_words<8>(hidden, out, batch, length, start, count, row_bytes, stream); break;
    case 4: extract_words<4>(hidden, out, batch, length, start, count, row_bytes, stream); break;
    case 2: extract_words<2>(hidden, out, batch, length, start, count, row_bytes, stream); break;
    default: extract_words<1>(hidden, out, batch, length, start, count, row_bytes, stream); break;
  }
  return last_error();
}

const char* launch_assemble_mask(const void* seg_mask, void* out, int64_t batch, int64_t num_read,
                                 int64_t seg_len, int64_t num_write, int64_t elem_bytes,
                                 uint64_t one_bits, CUstream_st* stream) {
  if (batch * (num_read + seg_len + num_write) == 0) return nullptr;
  switch (elem_bytes) {
    case 1: mask_words<1>(seg_mask, out, batch, num_read, seg_len, num_write, one_bits, stream);
      break;
    case 2: mask_words<2>(seg_mask, out, batch, num_read, seg_len, num_write, one_bits, stream);
      break;
    case 4: mask_words<4>(seg_mask, out, batch, num_read, seg_len, num_write, one_bits, stream);
      break;
    case 8: mask_words<8>(seg_mask, out, batch, num_read, seg_len, num_write, one_bits, stream);
      break;
    default: return "assemble_mask: mask element size must be 1, 2, 4 or 8 bytes";
  }
  return last_error();
}

}  // namespace cuda
}  // namespace rmt_fast
