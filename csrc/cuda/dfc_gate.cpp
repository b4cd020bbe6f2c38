// CUDA dispatch of the DFC attention gate: checks the contract, allocates the gate in x's memory
// format and launches the torch-free kernel (dfc_gate_kernel.cu) on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/dfc_gate_kernel.h"
#include "cuda/launch_checks.h"
#include "dfc_gate.h"

namespace ghostkernels {
namespace {

at::Tensor dfc_gate_forward_cuda(const at::Tensor& x, const at::Tensor& w_proj,
                                 const at::Tensor& b_proj, const at::Tensor& w_h,
                                 const at::Tensor& b_h, const at::Tensor& w_v,
                                 const at::Tensor& b_v) {
  const at::MemoryFormat fmt = check_dfc_gate_inputs(x, w_proj, b_proj, w_h, b_h, w_v, b_v);
  TORCH_CHECK(x.is_cuda(), "dfc_gate_forward (CUDA kernel): x must be a CUDA tensor");
  const cuda::DType dtype = kernel_dtype(x, "dfc_gate_forward");
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t C = w_proj.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gate = at::empty({B, C, H / 2, W / 2}, x.options().memory_format(fmt));
  if (gate.numel() == 0) return gate;
  const int64_t channel_blocks = (C + cuda::kDfcChannelBlock - 1) / cuda::kDfcChannelBlock;
  TORCH_CHECK(channel_blocks <= 65535, "dfc_gate_forward (CUDA kernel): at most ",
              65535 * cuda::kDfcChannelBlock, " channels, got ", C);
  TORCH_CHECK(B <= 65535, "dfc_gate_forward (CUDA kernel): batch at most 65535, got ", B);

  cuda::DfcGateArgs args{};
  args.x = x.data_ptr();
  args.w_proj = w_proj.data_ptr();
  args.b_proj = b_proj.data_ptr();
  args.w_h = w_h.data_ptr();
  args.b_h = b_h.data_ptr();
  args.w_v = w_v.data_ptr();
  args.b_v = b_v.data_ptr();
  args.gate = gate.data_ptr();
  args.batch = B;
  args.in_channels = Cin;
  args.channels = C;
  args.height = H;
  args.width = W;
  args.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  check_launch(cuda::launch_dfc_gate(args, dtype, c10::cuda::getCurrentCUDAStream().stream()),
               "dfc_gate_forward");
  return gate;
}

}  // namespace
}  // namespace ghostkernels

TORCH_LIBRARY_IMPL(ghostkernels_C, CUDA, m) {
  m.impl("dfc_gate_forward", &ghostkernels::dfc_gate_forward_cuda);
}
