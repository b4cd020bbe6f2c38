// Contract checks of the DFC attention gate (dfc_gate_forward), used by its CUDA implementation
// (csrc/cuda/dfc_gate.cpp). The Python op layer (ghostkernels/ops/dfc_gate.py) gives the friendly
// errors; these TORCH_CHECKs are defence in depth so that a direct torch.ops call can never read
// out of bounds.
#pragma once

#include <ATen/core/Tensor.h>

namespace ghostkernels {

// Checks x [B,Cin,H,W] (H, W >= 2, dense in NCHW or channels_last), w_proj [C,Cin], w_h [C,5],
// w_v [C,5] and the biases b_proj, b_h, b_v [C], all contiguous, of x's dtype and device;
// returns x's memory format.
at::MemoryFormat check_dfc_gate_inputs(const at::Tensor& x, const at::Tensor& w_proj,
                                       const at::Tensor& b_proj, const at::Tensor& w_h,
                                       const at::Tensor& b_h, const at::Tensor& w_v,
                                       const at::Tensor& b_v);

}  // namespace ghostkernels
