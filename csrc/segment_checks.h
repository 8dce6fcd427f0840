// Argument validation shared by the CPU (ops.cpp) and CUDA (cuda_ops.cpp) implementations.
// Every check runs before anything is written, so an op that raises leaves `out` untouched.
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>

namespace rmt_fast {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

struct AssembleDims {
  int64_t batch, num_read, seg_len, num_write, width;
  int64_t length() const { return num_read + seg_len + num_write; }
};

// read_mem [B, Mr, d], seg_emb [B, S, d], write_mem [B, Mw, d]: same B, d, dtype, device.
inline AssembleDims check_assemble_inputs(const at::Tensor& read_mem, const at::Tensor& seg_emb,
                                          const at::Tensor& write_mem) {
  TORCH_CHECK(seg_emb.dim() == 3, "assemble_segment: seg_emb must be a 3-D tensor [B, S, d], got "
              "shape ", shape_str(seg_emb));
  const int64_t batch = seg_emb.size(0), width = seg_emb.size(2);
  TORCH_CHECK(read_mem.dim() == 3 && read_mem.size(0) == batch && read_mem.size(2) == width,
              "assemble_segment: read_mem must be [B=", batch, ", M_r, d=", width,
              "] to match seg_emb ", shape_str(seg_emb), ", got shape ", shape_str(read_mem));
  TORCH_CHECK(write_mem.dim() == 3 && write_mem.size(0) == batch && write_mem.size(2) == width,
              "assemble_segment: write_mem must be [B=", batch, ", M_w, d=", width,
              "] to match seg_emb ", shape_str(seg_emb), ", got shape ", shape_str(write_mem));
  TORCH_CHECK(is_supported_float(seg_emb.scalar_type()),
              "assemble_segment: seg_emb dtype must be float32, float16, bfloat16 or float64, got ",
              seg_emb.scalar_type());
  TORCH_CHECK(read_mem.scalar_type() == seg_emb.scalar_type() &&
                  write_mem.scalar_type() == seg_emb.scalar_type(),
              "assemble_segment: read_mem, seg_emb and write_mem must have the same dtype, got ",
              read_mem.scalar_type(), ", ", seg_emb.scalar_type(), ", ", write_mem.scalar_type());
  TORCH_CHECK(read_mem.device() == seg_emb.device() && write_mem.device() == seg_emb.device(),
              "assemble_segment: read_mem, seg_emb and write_mem must be on the same device, got ",
              read_mem.device(), ", ", seg_emb.device(), ", ", write_mem.device());
  return AssembleDims{batch, read_mem.size(1), seg_emb.size(1), write_mem.size(1), width};
}

// `out` must be a contiguous tensor of exactly `sizes`, with `like`'s dtype and device.
inline void check_out(const char* op, const at::Tensor& out, at::IntArrayRef sizes,
                      const at::Tensor& like) {
  TORCH_CHECK(out.sizes() == sizes, op, ": out must have shape ", sizes, ", got shape ",
              shape_str(out));
  TORCH_CHECK(out.scalar_type() == like.scalar_type(), op, ": out must have dtype ",
              like.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(out.device() == like.device(), op, ": out must be on device ", like.device(),
              ", got ", out.device());
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous (shape ", shape_str(out),
              ", strides ", out.strides(), ")");
}

// hidden [B, L, d]; rows [start, start + count) must lie inside L.
inline void check_extract_inputs(const at::Tensor& hidden, int64_t start, int64_t count) {
  TORCH_CHECK(hidden.dim() == 3, "extract_memory: hidden must be a 3-D tensor [B, L, d], got "
              "shape ", shape_str(hidden));
  TORCH_CHECK(is_supported_float(hidden.scalar_type()),
              "extract_memory: hidden dtype must be float32, float16, bfloat16 or float64, got ",
              hidden.scalar_type());
  TORCH_CHECK(start >= 0 && count >= 0 && start + count <= hidden.size(1),
              "extract_memory: rows [start, start + count) = [", start, ", ", start + count,
              ") must lie inside hidden's L = ", hidden.size(1), " (hidden shape ",
              shape_str(hidden), ")");
}

// seg_mask [B, S]; num_read, num_write >= 0.
inline void check_mask_inputs(const at::Tensor& seg_mask, int64_t num_read, int64_t num_write) {
  TORCH_CHECK(seg_mask.dim() == 2, "assemble_mask: seg_mask must be a 2-D tensor [B, S], got "
              "shape ", shape_str(seg_mask));
  TORCH_CHECK(num_read >= 0 && num_write >= 0, "assemble_mask: num_read and num_write must be "
              ">= 0, got ", num_read, " and ", num_write);
}

}  // namespace rmt_fast
