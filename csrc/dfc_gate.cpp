// Schema of the DFC attention gate (namespace ghostkernels_C) and its contract checks. Only a CUDA
// kernel exists (csrc/cuda/dfc_gate.cpp); the Python side is ghostkernels/compiled/dfc_gate.py.
#include "dfc_gate.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ghost_ops.h"  // activation_memory_format, check_vector_param

namespace ghostkernels {

at::MemoryFormat check_dfc_gate_inputs(const at::Tensor& x, const at::Tensor& w_proj,
                                       const at::Tensor& b_proj, const at::Tensor& w_h,
                                       const at::Tensor& b_h, const at::Tensor& w_v,
                                       const at::Tensor& b_v) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-d [B,Cin,H,W], got shape ", x.sizes());
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, "x must be at least 2x2, got shape ", x.sizes());
  TORCH_CHECK(w_proj.dim() == 2, "w_proj must be 2-d [C,Cin], got shape ", w_proj.sizes());
  const int64_t c = w_proj.size(0);
  check_vector_param("w_proj", w_proj, x, {c, x.size(1)});
  check_vector_param("b_proj", b_proj, x, {c});
  check_vector_param("w_h", w_h, x, {c, 5});
  check_vector_param("b_h", b_h, x, {c});
  check_vector_param("w_v", w_v, x, {c, 5});
  check_vector_param("b_v", b_v, x, {c});
  return activation_memory_format(x);
}

}  // namespace ghostkernels

TORCH_LIBRARY_FRAGMENT(ghostkernels_C, m) {
  m.def(
      "dfc_gate_forward(Tensor x, Tensor w_proj, Tensor b_proj, Tensor w_h, Tensor b_h, "
      "Tensor w_v, Tensor b_v) -> Tensor");
}
