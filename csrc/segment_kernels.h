// Host launchers of the CUDA kernels in segment_kernels.cu. This header includes no CUDA or ATen
// header: the kernels live in a self-contained translation unit (segment_kernels.cu, which only
// includes segment_index.h and CUDA headers) and the ATen binding (cuda_ops.cpp) calls these.
//
// All tensors are contiguous, described by raw pointers and sizes. Each launcher enqueues on
// `stream` and returns nullptr on success or a static CUDA error string.
#pragma once

#include <cstdint>

struct CUstream_st;  // == cudaStream_t

namespace rmt_fast {
namespace cuda {

// out[B, Mr + S + Mw, row_bytes] <- [read | seg | write] along dim 1 (bitwise row copy).
const char* launch_assemble_segment(const void* read_mem, const void* seg_emb,
                                    const void* write_mem, void* out, int64_t batch,
                                    int64_t num_read, int64_t seg_len, int64_t num_write,
                                    int64_t row_bytes, CUstream_st* stream);

// out[B, count, row_bytes] <- hidden[B, start:start + count, row_bytes].
const char* launch_extract_memory(const void* hidden, void* out, int64_t batch, int64_t length,
                                  int64_t start, int64_t count, int64_t row_bytes,
                                  CUstream_st* stream);

// out[B, Mr + S + Mw] (elements of elem_bytes in {1, 2, 4, 8}): `one_bits` (the bit pattern of 1
// in the mask dtype) on memory rows, seg_mask[B, S] in the middle.
const char* launch_assemble_mask(const void* seg_mask, void* out, int64_t batch, int64_t num_read,
                                 int64_t seg_len, int64_t num_write, int64_t elem_bytes,
                                 uint64_t one_bits, CUstream_st* stream);

}  // namespace cuda
}  // namespace rmt_fast
