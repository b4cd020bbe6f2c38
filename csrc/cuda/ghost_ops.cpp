// CUDA dispatch of the folded Ghost op and the folded depthwise conv: checks the contract,
// allocates the output in x's memory format and launches the torch-free kernels
// (ghost_conv_kernel.cu, depthwise_conv_kernel.cu) on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "cuda/ghost_ops_kernel.h"
#include "cuda/launch_checks.h"
#include "ghost_ops.h"

namespace ghostkernels {
namespace {

at::Tensor ghost_conv_forward_cuda(const at::Tensor& x, const at::Tensor& w_primary,
                                   const at::Tensor& b_primary, const at::Tensor& w_cheap,
                                   const at::Tensor& b_cheap, bool relu_primary, bool relu_cheap,
                                   int64_t out_channels,
                                   const std::optional<at::Tensor>& input_scale,
                                   const std::optional<at::Tensor>& gate,
                                   const std::optional<at::Tensor>& residual) {
  const at::MemoryFormat fmt = check_ghost_conv_inputs(x, w_primary, b_primary, w_cheap, b_cheap,
                                                       out_channels, input_scale, gate, residual);
  TORCH_CHECK(x.is_cuda(), "ghost_conv_forward (CUDA kernel): x must be a CUDA tensor");
  const cuda::DType dtype = kernel_dtype(x, "ghost_conv_forward");
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t C1 = w_primary.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({B, out_channels, H, W}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;

  cuda::GhostConvArgs args{};
  args.x = x.data_ptr();
  args.w_primary = w_primary.data_ptr();
  args.b_primary = b_primary.data_ptr();
  args.w_cheap = w_cheap.data_ptr();
  args.b_cheap = b_cheap.data_ptr();
  args.input_scale = input_scale ? input_scale->data_ptr() : nullptr;
  args.gate = gate ? gate->data_ptr() : nullptr;
  args.residual = residual ? residual->data_ptr() : nullptr;
  args.gate_height = gate ? gate->size(2) : 1;
  args.gate_width = gate ? gate->size(3) : 1;
  args.y = y.data_ptr();
  args.batch = B;
  args.in_channels = Cin;
  args.height = H;
  args.width = W;
  args.primary_channels = C1;
  args.out_channels = out_channels;
  args.relu_primary = relu_primary;
  args.relu_cheap = relu_cheap;
  args.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  // Grid: x = spatial tiles, y = blocks of primary channels, z = batch (CUDA's limits).
  const cuda::GhostConvGrid grid = cuda::ghost_conv_grid(args, dtype);
  TORCH_CHECK(grid.tiles <= std::numeric_limits<int32_t>::max(),
              "ghost_conv_forward (CUDA kernel): H x W too large (", H, "x", W, " gives ",
              grid.tiles, " tiles, at most 2^31-1)");
  TORCH_CHECK(grid.channel_blocks <= 65535, "ghost_conv_forward (CUDA kernel): too many primary "
              "channels (", C1, " gives ", grid.channel_blocks, " channel blocks, at most 65535)");
  TORCH_CHECK(B <= 65535, "ghost_conv_forward (CUDA kernel): batch at most 65535, got ", B);
  check_launch(cuda::launch_ghost_conv(args, dtype, c10::cuda::getCurrentCUDAStream().stream()),
               "ghost_conv_forward");
  return y;
}

at::Tensor depthwise_conv_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& bias, int64_t kh, int64_t kw,
                                       int64_t stride, bool relu) {
  const at::MemoryFormat fmt = check_depthwise_conv_inputs(x, weight, bias, kh, kw, stride);
  TORCH_CHECK(x.is_cuda(), "depthwise_conv_forward (CUDA kernel): x must be a CUDA tensor");
  const cuda::DType dtype = kernel_dtype(x, "depthwise_conv_forward");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = depthwise_output_size(H, kh, stride);
  const int64_t Wo = depthwise_output_size(W, kw, stride);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({B, C, Ho, Wo}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;

  cuda::DepthwiseConvArgs args{};
  args.x = x.data_ptr();
  args.weight = weight.data_ptr();
  args.bias = bias.data_ptr();
  args.y = y.data_ptr();
  args.batch = B;
  args.channels = C;
  args.height = H;
  args.width = W;
  args.out_height = Ho;
  args.out_width = Wo;
  args.kh = static_cast<int>(kh);
  args.kw = static_cast<int>(kw);
  args.stride = static_cast<int>(stride);
  args.relu = relu;
  args.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  check_launch(
      cuda::launch_depthwise_conv(args, dtype, c10::cuda::getCurrentCUDAStream().stream()),
      "depthwise_conv_forward");
  return y;
}

}  // namespace
}  // namespace ghostkernels

TORCH_LIBRARY_IMPL(ghostkernels_C, CUDA, m) {
  m.impl("ghost_conv_forward", &ghostkernels::ghost_conv_forward_cuda);
  m.impl("depthwise_conv_forward", &ghostkernels::depthwise_conv_forward_cuda);
}
