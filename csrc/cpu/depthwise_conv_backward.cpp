// C++ CPU backward of the folded depthwise conv (ghostkernels_C::depthwise_conv_backward):
// grad_x, grad_weight [C, kh*kw] and grad_bias [C] of y = act(dwconv(x) + bias), from grad_y and,
// for a ReLU forward, its output y (the mask y > 0). One task per channel walks the batch, so
// grad_weight and grad_bias are summed in a fixed order (bitwise reproducible, no atomics) in
// float64 for float64 and float32 otherwise. Per plane: depthwise_planes.h. Any memory format
// comes in (channels_last inputs are made NCHW first); grad_x leaves in x's format.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu/depthwise_planes.h"
#include "ghost_ops.h"

namespace ghostkernels {
namespace {

template <typename scalar_t>
void depthwise_backward_kernel(const at::Tensor& grad_y, const at::Tensor& x,
                               const at::Tensor& weight, const at::Tensor& y, int64_t kh,
                               int64_t kw, int64_t stride, at::Tensor& grad_x, at::Tensor& grad_w,
                               at::Tensor& grad_b) {
  namespace dp = depthwise_planes;
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), taps = kh * kw;
  const int64_t group = dp::planes_per_group(H, W, kh, kw, B);
  const dp::Geometry full(H, W, kh, kw, stride, group);
  const int64_t in_plane = H * W, out_plane = full.Ho * full.Wo;
  const scalar_t* gyp = grad_y.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* yp = y.defined() ? y.data_ptr<scalar_t>() : nullptr;
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  scalar_t* gxp = grad_x.defined() ? grad_x.data_ptr<scalar_t>() : nullptr;
  scalar_t* gwp = grad_w.defined() ? grad_w.data_ptr<scalar_t>() : nullptr;
  scalar_t* gbp = grad_b.defined() ? grad_b.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gp(static_cast<size_t>(dp::grad_buffer_size(full)));
    std::vector<acc_t> buf(static_cast<size_t>(full.buffer_size()));
    std::vector<acc_t> w(static_cast<size_t>(taps)), dw(static_cast<size_t>(taps));
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t t = 0; t < taps; ++t) w[t] = static_cast<acc_t>(wp[c * taps + t]);
      std::fill(dw.begin(), dw.end(), acc_t(0));
      acc_t db = 0;
      for (int64_t b0 = 0; b0 < B; b0 += group) {
        const dp::Geometry g(H, W, kh, kw, stride, std::min(group, B - b0));
        const int64_t plane = b0 * C + c;
        dp::pitched_grad(g, gyp + plane * out_plane, yp ? yp + plane * out_plane : nullptr,
                         C * out_plane, gp.data());
        if (gxp)
          dp::grad_input(g, gp.data(), w.data(), buf.data(), gxp + plane * in_plane,
                         C * in_plane);
        if (gwp || gbp) {
          dp::fill_padded(g, xp + plane * in_plane, C * in_plane, buf.data());
          db += dp::accumulate_grad_weight(g, gp.data(), buf.data(), dw.data());
        }
      }
      if (gwp)
        for (int64_t t = 0; t < taps; ++t) gwp[c * taps + t] = static_cast<scalar_t>(dw[t]);
      if (gbp) gbp[c] = static_cast<scalar_t>(db);
    }
  });
}

// (grad_x, grad_weight, grad_bias); a gradient not asked for comes back as an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& y, int64_t kh, int64_t kw, int64_t stride,
    bool needs_input, bool needs_weight, bool needs_bias) {
  const at::MemoryFormat fmt = check_depthwise_conv_inputs(x, weight, kh, kw, stride);
  TORCH_CHECK(x.device().is_cpu(), "depthwise_conv_backward (CPU kernel): x must be a CPU tensor");
  const depthwise_planes::Geometry g(x.size(2), x.size(3), kh, kw, stride, 1);
  const std::vector<int64_t> out_shape{x.size(0), x.size(1), g.Ho, g.Wo};
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef(out_shape), "grad_y must have shape ",
              at::IntArrayRef(out_shape), ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              "grad_y must have x's dtype and device");
  if (y) {
    TORCH_CHECK(y->sizes() == grad_y.sizes() && y->scalar_type() == x.scalar_type() &&
                    y->device() == x.device(),
                "y must have grad_y's shape and x's dtype and device");
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor gyc = grad_y.contiguous();
  const at::Tensor yc = y ? y->contiguous() : at::Tensor();
  at::Tensor grad_x = needs_input ? at::empty_like(xc) : at::Tensor();
  at::Tensor grad_w = needs_weight ? at::empty_like(weight) : at::Tensor();
  at::Tensor grad_b = needs_bias ? at::empty({x.size(1)}, weight.options()) : at::Tensor();
  if (x.numel() > 0 && (needs_input || needs_weight || needs_bias)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "depthwise_conv_backward_cpu", [&] {
      depthwise_backward_kernel<scalar_t>(gyc, xc, weight, yc, kh, kw, stride, grad_x, grad_w,
                                          grad_b);
    });
  } else {
    if (needs_weight) grad_w.zero_();
    if (needs_bias) grad_b.zero_();
  }
  auto or_empty = [&](const at::Tensor& t) {
    return t.defined() ? t : at::empty({0}, x.options());
  };
  if (grad_x.defined() && fmt == at::MemoryFormat::ChannelsLast)
    grad_x = grad_x.contiguous(at::MemoryFormat::ChannelsLast);
  return {or_empty(grad_x), or_empty(grad_w), or_empty(grad_b)};
}

}  // namespace
}  // namespace ghostkernels

TORCH_LIBRARY_FRAGMENT(ghostkernels_C, m) {
  m.def(
      "depthwise_conv_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? y, int kh, int kw, "
      "int stride, bool needs_input, bool needs_weight, bool needs_bias) -> "
      "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ghostkernels_C, CPU, m) {
  m.impl("depthwise_conv_backward", &ghostkernels::depthwise_conv_backward_cpu);
}
