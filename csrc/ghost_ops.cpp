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

void check_vector_param(const char* name, const at::Tensor& t, const at::Tensor& x,
                        at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " must be on x's device ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

static void check_activation_param(const char* name, const at::Tensor& t, const at::Tensor& x,
                                   at::MemoryFormat fmt) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " must be on x's device ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(fmt), name, " must be contiguous in the output's memory format ",
              fmt, ", got strides ", t.strides());
}

at::MemoryFormat check_ghost_conv_inputs(const at::Tensor& x, const at::Tensor& w_primary,
                                         const at::Tensor& b_primary, const at::Tensor& w_cheap,
                                         const at::Tensor& b_cheap, int64_t out_channels,
                                         const std::optional<at::Tensor>& input_scale,
                                         const std::optional<at::Tensor>& gate,
                                         const std::optional<at::Tensor>& residual) {
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
  const at::MemoryFormat fmt = activation_memory_format(x);
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  if (input_scale) check_vector_param("input_scale", *input_scale, x, {B, x.size(1)});
  if (gate) {
    TORCH_CHECK(gate->dim() == 4 && gate->size(0) == B && gate->size(1) == out_channels &&
                    gate->size(2) >= 1 && gate->size(3) >= 1,
                "gate must have shape [B, out_channels, Hg >= 1, Wg >= 1] = [", B, ", ",
                out_channels, ", Hg, Wg], got ", gate->sizes());
    check_activation_param("gate", *gate, x, fmt);
  }
  if (residual) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({B, out_channels, H, W}),
                "residual must have shape [B, out_channels, H, W] = [", B, ", ", out_channels,
                ", ", H, ", ", W, "], got ", residual->sizes());
    check_activation_param("residual", *residual, x, fmt);
  }
  return fmt;
}

at::MemoryFormat check_depthwise_conv_inputs(const at::Tensor& x, const at::Tensor& weight,
                                             int64_t kh, int64_t kw, int64_t stride) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-d [B,C,H,W], got shape ", x.sizes());
  TORCH_CHECK((kh == 1 || kh == 3 || kh == 5) && (kw == 1 || kw == 3 || kw == 5),
              "kh and kw must each be 1, 3 or 5, got kh=", kh, ", kw=", kw);
  TORCH_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  check_vector_param("weight", weight, x, {x.size(1), kh * kw});
  return activation_memory_format(x);
}

at::MemoryFormat check_depthwise_conv_inputs(const at::Tensor& x, const at::Tensor& weight,
                                             const at::Tensor& bias, int64_t kh, int64_t kw,
                                             int64_t stride) {
  const at::MemoryFormat fmt = check_depthwise_conv_inputs(x, weight, kh, kw, stride);
  check_vector_param("bias", bias, x, {x.size(1)});
  return fmt;
}

}  // namespace ghostkernels

TORCH_LIBRARY_FRAGMENT(ghostkernels_C, m) {
  m.def(
      "ghost_conv_forward(Tensor x, Tensor w_primary, Tensor b_primary, Tensor w_cheap, "
      "Tensor b_cheap, bool relu_primary, bool relu_cheap, int out_channels, "
      "Tensor? input_scale=None, Tensor? gate=None, Tensor? residual=None) -> Tensor");
  m.def(
      "depthwise_conv_forward(Tensor x, Tensor weight, Tensor bias, int kh, int kw, int stride, "
      "bool relu) -> Tensor");
}
