// rmt_fast._C: operator schemas (TORCH_LIBRARY(rmt_fast, m)) and their CPU implementations.
//
// Ops (autograd and fake/meta kernels are registered from Python, rmt_fast/_extension.py):
//   assemble_segment(read_mem [B,Mr,d], seg_emb [B,S,d], write_mem [B,Mw,d]) -> [B, Mr+S+Mw, d]
//   assemble_segment_out(read_mem, seg_emb, write_mem, out [B, Mr+S+Mw, d]) -> ()
//   assemble_mask(seg_mask [B,S], num_read, num_write) -> [B, Mr+S+Mw] (memory rows = 1)
//   extract_memory(hidden [B,L,d], start, count) -> [B, count, d] (= hidden[:, start:start+count])
//   extract_memory_out(hidden, start, count, out [B, count, d]) -> ()
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "segment_checks.h"
#include "segment_index.h"

extern "C" {
// A dummy module so that `import rmt_fast._C` loads this library (and runs the registrations
// below); the ops are reached through torch.ops.rmt_fast, not through this module.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      nullptr,  // doc
      -1,       // per-interpreter state size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}

namespace rmt_fast {
namespace {

// Rows per parallel task: keep tasks at >= ~32K elements.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

void assemble_segment_out_cpu(const at::Tensor& read_mem, const at::Tensor& seg_emb,
                              const at::Tensor& write_mem, const at::Tensor& out) {
  const AssembleDims dims = check_assemble_inputs(read_mem, seg_emb, write_mem);
  TORCH_CHECK(seg_emb.device().is_cpu(), "assemble_segment (CPU kernel): inputs must be on CPU, "
              "got ", seg_emb.device());
  check_out("assemble_segment", out, {dims.batch, dims.length(), dims.width}, seg_emb);
  const at::Tensor r = read_mem.contiguous(), s = seg_emb.contiguous(), w = write_mem.contiguous();
  const int64_t rows = dims.batch * dims.length(), width = dims.width;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "assemble_segment",
                                  [&] {
    const scalar_t* parts[3] = {r.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
                                w.const_data_ptr<scalar_t>()};
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(width), [&](int64_t begin, int64_t end) {
      for (int64_t flat_row = begin; flat_row < end; ++flat_row) {
        int64_t b, row, col;
        unflatten3(flat_row * width, dims.length(), width, &b, &row, &col);
        const SourceIndex src = assemble_source(b, row, 0, dims.num_read, dims.seg_len,
                                                dims.num_write, width);
        const scalar_t* from = parts[src.part] + src.offset;
        std::copy(from, from + width, dst + flat_row * width);
      }
    });
  });
}

at::Tensor assemble_segment_cpu(const at::Tensor& read_mem, const at::Tensor& seg_emb,
                                const at::Tensor& write_mem) {
  const AssembleDims dims = check_assemble_inputs(read_mem, seg_emb, write_mem);
  at::Tensor out = at::empty({dims.batch, dims.length(), dims.width}, seg_emb.options());
  assemble_segment_out_cpu(read_mem, seg_emb, write_mem, out);
  return out;
}

at::Tensor assemble_mask_cpu(const at::Tensor& seg_mask, int64_t num_read, int64_t num_write) {
  check_mask_inputs(seg_mask, num_read, num_write);
  const at::Tensor m = seg_mask.contiguous();
  const int64_t batch = m.size(0), seg_len = m.size(1), length = num_read + seg_len + num_write;
  at::Tensor out = at::empty({batch, length}, m.options());
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, m.scalar_type(),
                             "assemble_mask", [&] {
    const scalar_t* src = m.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const scalar_t one = static_cast<scalar_t>(1);
    at::parallel_for(0, batch * length, 32768, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        int64_t b, row, col;
        unflatten3(i, length, 1, &b, &row, &col);
        const SourceIndex s = assemble_source(b, row, col, num_read, seg_len, num_write, 1);
        dst[i] = s.part == kSegment ? src[s.offset] : one;
      }
    });
  });
  return out;
}

void extract_memory_out_cpu(const at::Tensor& hidden, int64_t start, int64_t count,
                            const at::Tensor& out) {
  check_extract_inputs(hidden, start, count);
  TORCH_CHECK(hidden.device().is_cpu(), "extract_memory (CPU kernel): hidden must be on CPU, "
              "got ", hidden.device());
  const int64_t batch = hidden.size(0), length = hidden.size(1), width = hidden.size(2);
  check_out("extract_memory", out, {batch, count, width}, hidden);
  const at::Tensor h = hidden.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "extract_memory",
                                  [&] {
    const scalar_t* src = h.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * count, row_grain(width), [&](int64_t begin, int64_t end) {
      for (int64_t flat_row = begin; flat_row < end; ++flat_row) {
        const int64_t b = flat_row / count, j = flat_row % count;
        const scalar_t* from = src + extract_source(b, j, 0, start, length, width);
        std::copy(from, from + width, dst + flat_row * width);
      }
    });
  });
}

at::Tensor extract_memory_cpu(const at::Tensor& hidden, int64_t start, int64_t count) {
  check_extract_inputs(hidden, start, count);
  at::Tensor out = at::empty({hidden.size(0), count, hidden.size(2)}, hidden.options());
  extract_memory_out_cpu(hidden, start, count, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(rmt_fast, m) {
  m.def("assemble_segment(Tensor read_mem, Tensor seg_emb, Tensor write_mem) -> Tensor");
  m.def("assemble_segment_out(Tensor read_mem, Tensor seg_emb, Tensor write_mem, "
        "Tensor(a!) out) -> ()");
  m.def("assemble_mask(Tensor seg_mask, int num_read, int num_write) -> Tensor");
  m.def("extract_memory(Tensor hidden, int start, int count) -> Tensor");
  m.def("extract_memory_out(Tensor hidden, int start, int count, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(rmt_fast, CPU, m) {
  m.impl("assemble_segment", &assemble_segment_cpu);
  m.impl("assemble_segment_out", &assemble_segment_out_cpu);
  m.impl("assemble_mask", &assemble_mask_cpu);
  m.impl("extract_memory", &extract_memory_cpu);
  m.impl("extract_memory_out", &extract_memory_out_cpu);
}

}  // namespace rmt_fast
