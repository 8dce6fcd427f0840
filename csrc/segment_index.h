// Per-element index math of the RMT segment layout, shared by the CPU kernels (ops.cpp) and the
// CUDA kernels (segment_kernels.cu). Plain g++ compiles it (RMT_HD expands to nothing), nvcc
// compiles it for host and device. No ATen / CUDA includes on purpose.
//
// Layout of one assembled segment (dim 1 of a contiguous [B, L, W] tensor, L = Mr + S + Mw):
//
//   rows [0, Mr)            <- read memory  [B, Mr, W]
//   rows [Mr, Mr + S)       <- segment      [B, S,  W]
//   rows [Mr + S, L)        <- write memory [B, Mw, W]
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define RMT_HD __host__ __device__
#else
#define RMT_HD
#endif

namespace rmt_fast {

// Which input an assembled row comes from.
enum SegmentPart : int { kReadMemory = 0, kSegment = 1, kWriteMemory = 2 };

// Source of one destination row/element: the input (`part`) and the element offset into it.
struct SourceIndex {
  int part;
  int64_t offset;
};

// Offset (in elements) of (b, row, col) in a contiguous [batch, rows, width] tensor.
RMT_HD inline int64_t offset3(int64_t b, int64_t row, int64_t col, int64_t rows, int64_t width) {
  return (b * rows + row) * width + col;
}

// Splits a flat index over a contiguous [batch, rows, width] tensor into (b, row, col).
RMT_HD inline void unflatten3(int64_t flat, int64_t rows, int64_t width, int64_t* b, int64_t* row,
                              int64_t* col) {
  *col = flat % width;
  const int64_t r = flat / width;
  *row = r % rows;
  *b = r / rows;
}

// Where element (b, row, col) of the assembled [B, Mr + S + Mw, W] tensor comes from.
RMT_HD inline SourceIndex assemble_source(int64_t b, int64_t row, int64_t col, int64_t num_read,
                                          int64_t seg_len, int64_t num_write, int64_t width) {
  SourceIndex s;
  if (row < num_read) {
    s.part = kReadMemory;
    s.offset = offset3(b, row, col, num_read, width);
  } else if (row < num_read + seg_len) {
    s.part = kSegment;
    s.offset = offset3(b, row - num_read, col, seg_len, width);
  } else {
    s.part = kWriteMemory;
    s.offset = offset3(b, row - num_read - seg_len, col, num_write, width);
  }
  return s;
}

// Offset into hidden [B, L, W] of element (b, j, col) of the extracted memory [B, count, W]
// (rows start .. start + count - 1 of hidden).
RMT_HD inline int64_t extract_source(int64_t b, int64_t j, int64_t col, int64_t start,
                                     int64_t length, int64_t width) {
  return offset3(b, start + j, col, length, width);
}

}  // namespace rmt_fast
