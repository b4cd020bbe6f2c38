// Schemas of the folded Ghost op and the folded depthwise conv (namespace ghostkernels_C), and the
// contract checks shared by their CPU (csrc/cpu/ghost_ops.cpp) and CUDA (csrc/cuda/ghost_ops.cpp)
// implementations. The Python side is ghostkernels/compiled/{ghost_conv,depthwise_conv}.py.
#include "ghost_ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace ghostkernels {

at::MemoryFormat activation_memory_format(const at::Tensor& x) {
  // The op layer's rule: channels_last iff x is channels_last and not also NCHW-contiguous.
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "x must be contiguous in NCHW or in channels_last, got strides ", x.strides());
  return at::MemoryFormat::ChannelsLast;
}

static void check_vector_param(const char* name, const at::Tensor& t, const at::Tensor& x,
                               at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " must be on x's device ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

at::MemoryFormat check_ghost_conv_inputs(const at::Tensor& x, const at::Tensor& w_primary,
                                         const at::Tensor& b_primary, const at::Tensor& w_cheap,
                                         const at::Tensor& b_cheap, int64_t out_channels) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-d [B,Cin,H,W], got shape ", x.sizes());
  TORCH_CHECK(w_primary.dim() == 2, "w_primary must be 2-d [C1,Cin], got shape ",
              w_primary.sizes());
  const int64_t c1 = w_primary.size(0);
  check_vector_param("w_primary", w_primary, x, {c1, x.size(1)});
  check_vector_param("b_primary", b_primary, x, {c1});
  check_vector_param("w_cheap", w_cheap, x, {c1, 9});
  check_vector_param("b_cheap", b_cheap, x, {c1});
  TORCH_CHECK(c1 <= out_channels && out_channels <= 2 * c1,
              "out_channels must lie in [C1, 2*C1] = [", c1, ", ", 2 * c1, "], got ",
              out_channels);
  return activation_memory_format(x);
}

at::MemoryFormat check_depthwise_conv_inputs(const at::Tensor& x, const at::Tensor& weight,
                                             const at::Tensor& bias, int64_t kh, int64_t kw,
                                             int64_t stride) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-d [B,C,H,W], got shape ", x.sizes());
  TORCH_CHECK((kh == 1 || kh == 3 || kh == 5) && (kw == 1 || kw == 3 || kw == 5),
              "kh and kw must each be 1, 3 or 5, got kh=", kh, ", kw=", kw);
  TORCH_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  const int64_t c = x.size(1);
  check_vector_param("weight", weight, x, {c, kh * kw});
  check_vector_param("bias", bias, x, {c});
  return activation_memory_format(x);
}

}  // namespace ghostkernels

TORCH_LIBRARY_FRAGMENT(ghostkernels_C, m) {
  m.def(
      "ghost_conv_forward(Tensor x, Tensor w_primary, Tensor b_primary, Tensor w_cheap, "
      "Tensor b_cheap, bool relu_primary, bool relu_cheap, int out_channels) -> Tensor");
  m.def(
      "depthwise_conv_forward(Tensor x, Tensor weight, Tensor bias, int kh, int kw, int stride, "
      "bool relu) -> Tensor");
}
