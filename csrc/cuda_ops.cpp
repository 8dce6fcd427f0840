// CUDA implementations of the rmt_fast ops: ATen glue around the raw-pointer launchers of
// segment_kernels.cu. Compiled only in a CUDA build (setup.py defines RMT_FAST_WITH_CUDA when it
// adds the .cu sources); in a CPU build this translation unit is empty.
#ifdef RMT_FAST_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>

#include "segment_checks.h"
#include "segment_kernels.h"

namespace rmt_fast {
namespace {

void check_launch(const char* op, const char* err) {
  TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err);
}

void assemble_segment_out_cuda(const at::Tensor& read_mem, const at::Tensor& seg_emb,
                               const at::Tensor& write_mem, const at::Tensor& out) {
  const AssembleDims dims = check_assemble_inputs(read_mem, seg_emb, write_mem);
  TORCH_CHECK(seg_emb.is_cuda(), "assemble_segment (CUDA kernel): inputs must be on CUDA, got ",
              seg_emb.device());
  check_out("assemble_segment", out, {dims.batch, dims.length(), dims.width}, seg_emb);
  const c10::cuda::CUDAGuard guard(seg_emb.device());
  const at::Tensor r = read_mem.contiguous(), s = seg_emb.contiguous(), w = write_mem.contiguous();
  check_launch("assemble_segment", cuda::launch_assemble_segment(
      r.const_data_ptr(), s.const_data_ptr(), w.const_data_ptr(), out.mutable_data_ptr(),
      dims.batch, dims.num_read, dims.seg_len, dims.num_write,
      dims.width * static_cast<int64_t>(s.element_size()),
      c10::cuda::getCurrentCUDAStream().stream()));
}

at::Tensor assemble_segment_cuda(const at::Tensor& read_mem, const at::Tensor& seg_emb,
                                 const at::Tensor& write_mem) {
  const AssembleDims dims = check_assemble_inputs(read_mem, seg_emb, write_mem);
  at::Tensor out = at::empty({dims.batch, dims.length(), dims.width}, seg_emb.options());
  assemble_segment_out_cuda(read_mem, seg_emb, write_mem, out);
  return out;
}

void extract_memory_out_cuda(const at::Tensor& hidden, int64_t start, int64_t count,
                             const at::Tensor& out) {
  check_extract_inputs(hidden, start, count);
  TORCH_CHECK(hidden.is_cuda(), "extract_memory (CUDA kernel): hidden must be on CUDA, got ",
              hidden.device());
  check_out("extract_memory", out, {hidden.size(0), count, hidden.size(2)}, hidden);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor h = hidden.contiguous();
  check_launch("extract_memory", cuda::launch_extract_memory(
      h.const_data_ptr(), out.mutable_data_ptr(), h.size(0), h.size(1), start, count,
      h.size(2) * static_cast<int64_t>(h.element_size()),
      c10::cuda::getCurrentCUDAStream().stream()));
}

at::Tensor extract_memory_cuda(const at::Tensor& hidden, int64_t start, int64_t count) {
  check_extract_inputs(hidden, start, count);
  at::Tensor out = at::empty({hidden.size(0), count, hidden.size(2)}, hidden.options());
  extract_memory_out_cuda(hidden, start, count, out);
  return out;
}

at::Tensor assemble_mask_cuda(const at::Tensor& seg_mask, int64_t num_read, int64_t num_write) {
  check_mask_inputs(seg_mask, num_read, num_write);
  TORCH_CHECK(seg_mask.element_size() <= 8 && !seg_mask.is_complex(),
              "assemble_mask (CUDA kernel): unsupported mask dtype ", seg_mask.scalar_type());
  const c10::cuda::CUDAGuard guard(seg_mask.device());
  const at::Tensor m = seg_mask.contiguous();
  // Bit pattern of the value 1 in the mask dtype.
  uint64_t one_bits = 0;
  const at::Tensor one = at::ones({1}, m.options().device(at::kCPU));
  std::memcpy(&one_bits, one.const_data_ptr(), one.element_size());
  at::Tensor out = at::empty({m.size(0), num_read + m.size(1) + num_write}, m.options());
  check_launch("assemble_mask", cuda::launch_assemble_mask(
      m.const_data_ptr(), out.mutable_data_ptr(), m.size(0), num_read, m.size(1), num_write,
      static_cast<int64_t>(m.element_size()), one_bits,
      c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rmt_fast, CUDA, m) {
  m.impl("assemble_segment", &assemble_segment_cuda);
  m.impl("assemble_segment_out", &assemble_segment_out_cuda);
  m.impl("assemble_mask", &assemble_mask_cuda);
  m.impl("extract_memory", &extract_memory_cuda);
  m.impl("extract_memory_out", &extract_memory_out_cuda);
}

}  // namespace rmt_fast

#endif  // RMT_FAST_WITH_CUDA
