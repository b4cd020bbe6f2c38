// Contract checks and output allocation shared by the CPU and CUDA kernels of the folded Ghost
// op (ghost_conv_forward) and the folded depthwise conv (depthwise_conv_forward).
//
// The Python op layer (ghostkernels/ops/ghost_conv.py, depthwise_conv.py) gives the friendly
// errors; these TORCH_CHECKs are defence in depth so that a direct torch.ops call can never read
// out of bounds.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace ghostkernels {

// x's memory format: Contiguous (NCHW) when x.is_contiguous(), else ChannelsLast (x must then be
// dense in channels_last).
at::MemoryFormat activation_memory_format(const at::Tensor& x);

// A weight/bias-like tensor: exactly `shape`, x's dtype and device, contiguous (named in errors).
void check_vector_param(const char* name, const at::Tensor& t, const at::Tensor& x,
                        at::IntArrayRef shape);

// Checks x [B,Cin,H,W], w_primary [C1,Cin], b_primary [C1], w_cheap [C1,9], b_cheap [C1],
// C1 <= out_channels <= 2*C1, and the optional input_scale [B,Cin] (contiguous), gate
// [B,out_channels,Hg,Wg] and residual [B,out_channels,H,W] (both dense in x's memory format);
// returns x's memory format.
at::MemoryFormat check_ghost_conv_inputs(const at::Tensor& x, const at::Tensor& w_primary,
                                         const at::Tensor& b_primary, const at::Tensor& w_cheap,
                                         const at::Tensor& b_cheap, int64_t out_channels,
                                         const std::optional<at::Tensor>& input_scale,
                                         const std::optional<at::Tensor>& gate,
                                         const std::optional<at::Tensor>& residual);

// Checks x [B,C,H,W], weight [C,kh*kw], bias [C], kh/kw in {1,3,5}, stride in {1,2};
// returns x's memory format.
at::MemoryFormat check_depthwise_conv_inputs(const at::Tensor& x, const at::Tensor& weight,
                                             const at::Tensor& bias, int64_t kh, int64_t kw,
                                             int64_t stride);
// The same without a bias (the backward).
at::MemoryFormat check_depthwise_conv_inputs(const at::Tensor& x, const at::Tensor& weight,
                                             int64_t kh, int64_t kw, int64_t stride);

// Output length of a conv with kernel k, padding k/2 and the given stride.
inline int64_t depthwise_output_size(int64_t in, int64_t k, int64_t stride) {
  return (in + 2 * (k / 2) - k) / stride + 1;
}

}  // namespace ghostkernels
