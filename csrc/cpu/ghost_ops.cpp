// C++ CPU kernels of the folded Ghost op and the folded depthwise conv.
//
// ghost_conv: y[:, :C1] = x1 = act_p(W1 (s x) + b1), y[:, C1:] = act_c(dw3x3(x1, pad 1) + b2)
// [:, :C2] with C2 = out_channels - C1, then the epilogues y = y * gate[.., h*Hg/H, w*Wg/W] +
// residual.
// One pass per (image, strip of rows): the 1x1 conv fills a thread-local buffer holding x1 for
// the strip plus one halo row above and below (zero outside the image, and zero-padded columns
// left and right), the strip's rows go straight to y, then the 3x3 depthwise conv reads the
// buffer. x1 never exists as a tensor and there is no concatenation. The optional input scale s
// [B][Cin] is folded into the GEMM's weights per image (W1 diag(s_b): the same products in a
// different order), and the gate/residual are applied as each value is stored.
//
// depthwise_conv: y = act(dwconv_{kh x kw}(x, stride, padding (kh/2, kw/2)) + bias); NCHW through
// zero-padded copies of one channel's planes (depthwise_planes.h, shared with the backward in
// depthwise_conv_backward.cpp), channels_last per output pixel with the channels innermost.
//
// The ghost 1x1 conv is one GEMM per strip (at::addmm_out into the buffer; half inputs are
// converted to float32 first). Both ops support NCHW and channels_last (two loop orders, each
// with a contiguous inner loop), float64/float32/float16/bfloat16, accumulating in float64 for
// float64 and float32 otherwise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/depthwise_planes.h"
#include "ghost_ops.h"

namespace ghostkernels {
namespace {

template <typename acc_t>
inline acc_t activate(acc_t v, bool relu) {
  return (relu && v < acc_t(0)) ? acc_t(0) : v;
}

template <typename acc_t, typename scalar_t>
std::vector<acc_t> to_acc(const at::Tensor& t) {
  const scalar_t* p = t.data_ptr<scalar_t>();
  return std::vector<acc_t>(p, p + t.numel());
}

// [rows, cols] row-major -> [cols, rows] row-major.
template <typename acc_t>
std::vector<acc_t> transposed(const std::vector<acc_t>& m, int64_t rows, int64_t cols) {
  std::vector<acc_t> t(m.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = m[r * cols + c];
  return t;
}

// acc[o] += w * in[o * stride + offset] for the o in [0, n) whose read lies inside [0, len):
// one tap of a 1-d convolution row with zero padding, with a contiguous (vectorisable) inner loop.
template <typename acc_t, typename in_t>
inline void accumulate_tap(acc_t* acc, const in_t* in, acc_t w, int64_t n, int64_t len,
                           int64_t stride, int64_t offset) {
  const int64_t lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  const int64_t hi = len - 1 - offset < 0 ? 0 : std::min(n, (len - 1 - offset) / stride + 1);
  if (stride == 1) {
    for (int64_t o = lo; o < hi; ++o) acc[o] += w * static_cast<acc_t>(in[o + offset]);
  } else {
    for (int64_t o = lo; o < hi; ++o) acc[o] += w * static_cast<acc_t>(in[o * stride + offset]);
  }
}

// Rows per strip: the strip buffer stays within ~256 KiB (L2-sized), and there are enough
// strips to keep every thread busy (smaller strips recompute relatively more halo rows).
int64_t strip_rows(int64_t batch, int64_t height, int64_t width, int64_t c1, size_t elem) {
  const int64_t row_bytes = std::max<int64_t>(1, width * c1 * static_cast<int64_t>(elem));
  int64_t rows = std::clamp<int64_t>((256 * 1024) / row_bytes - 2, 1, 32);
  const int64_t want_tasks = 2 * static_cast<int64_t>(at::get_num_threads());
  while (rows > 1 && batch * ((height + rows - 1) / rows) < want_tasks) rows = (rows + 1) / 2;
  return std::min(rows, std::max<int64_t>(height, 1));
}

struct GhostShape {
  int64_t B, Cin, H, W, C1, C2, Cout;
};

// The optional fused extras of ghost_conv (undefined tensors when absent).
struct GhostExtras {
  at::Tensor input_scale;  // [B, Cin]
  at::Tensor gate;         // [B, Cout, Hg, Wg], in y's layout
  at::Tensor residual;     // [B, Cout, H, W], in y's layout
};

// out[i] = v[i] * gate[gather[i]] + residual[i] for i in [0, n), rounded once; gate and residual
// may be null (skipped); a null gather means gate[i].
template <typename scalar_t, typename acc_t>
inline void store_values(scalar_t* out, const acc_t* v, int64_t n, const scalar_t* gate,
                         const int64_t* gather, const scalar_t* residual) {
  for (int64_t i = 0; i < n; ++i) {
    acc_t r = v[i];
    if (gate) r *= static_cast<acc_t>(gate[gather ? gather[i] : i]);
    if (residual) r += static_cast<acc_t>(residual[i]);
    out[i] = static_cast<scalar_t>(r);
  }
}

template <typename scalar_t, bool kChannelsLast>
void ghost_conv_kernel(const at::Tensor& x, const at::Tensor& w_primary,
                       const at::Tensor& b_primary, const at::Tensor& w_cheap,
                       const at::Tensor& b_cheap, bool relu_primary, bool relu_cheap,
                       const GhostShape& s, const GhostExtras& extras, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvertInput = !std::is_same_v<acc_t, scalar_t>;  // float16/bfloat16
  const int64_t B = s.B, Cin = s.Cin, H = s.H, W = s.W, C1 = s.C1, C2 = s.C2, Cout = s.Cout;
  const at::TensorOptions acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // Detached: the GEMM below writes with out= (the op's autograd formula lives in Python).
  const at::Tensor w1 = w_primary.detach().to(acc_options.dtype()).contiguous();  // [C1, Cin]
  const at::Tensor b1 = b_primary.detach().to(acc_options.dtype()).contiguous();
  const std::vector<acc_t> wc = to_acc<acc_t, scalar_t>(w_cheap);  // [C1][9]
  const std::vector<acc_t> wct = transposed(wc, C1, 9);            // [9][C1]
  const std::vector<acc_t> b2 = to_acc<acc_t, scalar_t>(b_cheap);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const at::Tensor scale = extras.input_scale.defined()
                               ? extras.input_scale.to(acc_options.dtype()).contiguous()
                               : at::Tensor();
  const scalar_t* gate = extras.gate.defined() ? extras.gate.data_ptr<scalar_t>() : nullptr;
  const scalar_t* residual =
      extras.residual.defined() ? extras.residual.data_ptr<scalar_t>() : nullptr;
  const int64_t Hg = gate ? extras.gate.size(2) : 1, Wg = gate ? extras.gate.size(3) : 1;
  std::vector<int64_t> gate_col(static_cast<size_t>(W));  // nearest gate column of each w
  for (int64_t w = 0; w < W; ++w) gate_col[w] = w * Wg / W;
  // Where the gate and residual values of y's element at yr (a pointer into y) start: the gate
  // row (NCHW; indexed with gate_col) or pixel (channels_last) and the residual's same element.
  auto gate_at = [&](int64_t b, int64_t c, int64_t row, int64_t w) -> const scalar_t* {
    if (!gate) return nullptr;
    const int64_t gh = row * Hg / H;
    return kChannelsLast ? gate + ((b * Hg + gh) * Wg + gate_col[w]) * Cout + c
                         : gate + ((b * Cout + c) * Hg + gh) * Wg;
  };
  auto residual_at = [&](const scalar_t* yr) -> const scalar_t* {
    return residual ? residual + (yr - yp) : nullptr;
  };
  const int64_t* nchw_gather = kChannelsLast ? nullptr : gate_col.data();

  const int64_t R = strip_rows(B, H, W, C1, sizeof(acc_t));
  const int64_t n_strips = (H + R - 1) / R;
  const int64_t buf_rows = R + 2;
  // The strip buffer holds x1 for image rows r0-1 .. r1 (buffer row i = image row r0-1+i), zero
  // for rows outside the image. NCHW: [C1][R+2][W]; channels_last: [R+2][W][C1].

  at::parallel_for(0, B * n_strips, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(static_cast<size_t>(C1 * buf_rows * W));
    std::vector<acc_t> x_acc(kConvertInput ? static_cast<size_t>(Cin * buf_rows * W) : 0);
    std::vector<acc_t> row_acc(static_cast<size_t>(std::max(W, C1)));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_strips;
      const int64_t r0 = (task % n_strips) * R;
      const int64_t r1 = std::min(H, r0 + R);
      const int64_t first = r0 - 1;                      // image row of buffer row 0
      const int64_t v0 = std::max<int64_t>(first, 0);    // buffered rows inside the image
      const int64_t v1 = std::min(H, C2 > 0 ? r1 + 1 : r1);
      const int64_t n = (v1 - v0) * W;                   // pixels of those rows

      // 1x1 conv + bias as one GEMM over the strip's pixels, straight into the buffer; the
      // input scale of image b, if any, scales the weights' columns.
      const at::Tensor w1b = scale.defined() ? w1 * scale[b].view({1, Cin}) : w1;
      const scalar_t* x_strip = kChannelsLast ? xp + (b * H + v0) * W * Cin
                                              : xp + b * Cin * H * W + v0 * W;
      const acc_t* x_src = reinterpret_cast<const acc_t*>(x_strip);
      int64_t x_channel_stride = kChannelsLast ? 1 : H * W;
      if constexpr (kConvertInput) {
        for (int64_t k = 0; k < (kChannelsLast ? 1 : Cin); ++k) {
          const scalar_t* src = x_strip + k * H * W;
          acc_t* dst = x_acc.data() + k * n;
          const int64_t len = kChannelsLast ? n * Cin : n;
          for (int64_t e = 0; e < len; ++e) dst[e] = static_cast<acc_t>(src[e]);
        }
        x_src = x_acc.data();
        x_channel_stride = kChannelsLast ? 1 : n;
      }
      if constexpr (kChannelsLast) {
        const at::Tensor xs = at::from_blob(const_cast<acc_t*>(x_src), {n, Cin}, acc_options);
        at::Tensor out = at::from_blob(buf.data() + (v0 - first) * W * C1, {n, C1}, acc_options);
        at::addmm_out(out, b1, xs, w1b.t());
      } else {
        const at::Tensor xs = at::from_blob(const_cast<acc_t*>(x_src), {Cin, n},
                                            {x_channel_stride, 1}, acc_options);
        at::Tensor out = at::from_blob(buf.data() + (v0 - first) * W, {C1, n},
                                       {buf_rows * W, 1}, acc_options);
        at::addmm_out(out, b1.view({C1, 1}), w1b, xs);
      }

      // act; zero rows outside the image (the depthwise padding); interior rows -> y[:, :C1].
      for (int64_t row = first; row < first + buf_rows; ++row) {
        const int64_t i = row - first;
        const bool inside = row >= v0 && row < v1;
        const bool interior = row >= r0 && row < r1;
        if constexpr (kChannelsLast) {
          acc_t* r = buf.data() + i * W * C1;  // [W][C1]
          for (int64_t e = 0; e < W * C1; ++e)
            r[e] = inside ? activate(r[e], relu_primary) : acc_t(0);
          if (!interior) continue;
          for (int64_t w = 0; w < W; ++w) {
            scalar_t* yr = yp + ((b * H + row) * W + w) * Cout;
            store_values(yr, r + w * C1, C1, gate_at(b, 0, row, w), nullptr, residual_at(yr));
          }
        } else {
          for (int64_t c = 0; c < C1; ++c) {
            acc_t* r = buf.data() + (c * buf_rows + i) * W;  // [W]
            for (int64_t w = 0; w < W; ++w)
              r[w] = inside ? activate(r[w], relu_primary) : acc_t(0);
            if (!interior) continue;
            scalar_t* yr = yp + ((b * Cout + c) * H + row) * W;
            store_values(yr, r, W, gate_at(b, c, row, 0), nchw_gather, residual_at(yr));
          }
        }
      }

      // 3x3 depthwise conv + bias + act from the buffer into y[:, C1:C1+C2].
      for (int64_t row = r0; row < r1 && C2 > 0; ++row) {
        const int64_t i = row - first;
        if constexpr (kChannelsLast) {
          for (int64_t w = 0; w < W; ++w) {
            acc_t* sums = row_acc.data();
            for (int64_t c = 0; c < C2; ++c) sums[c] = b2[c];
            for (int64_t t = 0; t < 9; ++t) {
              const int64_t iw = w - 1 + t % 3;
              if (iw < 0 || iw >= W) continue;
              const acc_t* in = buf.data() + ((i - 1 + t / 3) * W + iw) * C1;
              const acc_t* wt = &wct[t * C1];
              for (int64_t c = 0; c < C2; ++c) sums[c] += wt[c] * in[c];
            }
            for (int64_t c = 0; c < C2; ++c) sums[c] = activate(sums[c], relu_cheap);
            scalar_t* yr = yp + ((b * H + row) * W + w) * Cout + C1;
            store_values(yr, sums, C2, gate_at(b, C1, row, w), nullptr, residual_at(yr));
          }
        } else {
          for (int64_t c = 0; c < C2; ++c) {
            acc_t* acc = row_acc.data();
            std::fill(acc, acc + W, b2[c]);
            for (int64_t t = 0; t < 9; ++t) {
              const acc_t* in = buf.data() + (c * buf_rows + i - 1 + t / 3) * W;
              accumulate_tap(acc, in, wc[c * 9 + t], W, W, 1, t % 3 - 1);
            }
            for (int64_t w = 0; w < W; ++w) acc[w] = activate(acc[w], relu_cheap);
            scalar_t* yr = yp + ((b * Cout + C1 + c) * H + row) * W;
            store_values(yr, acc, W, gate_at(b, C1 + c, row, 0), nchw_gather, residual_at(yr));
          }
        }
      }
    }
  });
}

at::Tensor ghost_conv_forward_cpu(const at::Tensor& x, const at::Tensor& w_primary,
                                  const at::Tensor& b_primary, const at::Tensor& w_cheap,
                                  const at::Tensor& b_cheap, bool relu_primary, bool relu_cheap,
                                  int64_t out_channels,
                                  const std::optional<at::Tensor>& input_scale,
                                  const std::optional<at::Tensor>& gate,
                                  const std::optional<at::Tensor>& residual) {
  const at::MemoryFormat fmt = check_ghost_conv_inputs(x, w_primary, b_primary, w_cheap, b_cheap,
                                                       out_channels, input_scale, gate, residual);
  TORCH_CHECK(x.device().is_cpu(), "ghost_conv_forward (CPU kernel): x must be a CPU tensor");
  const GhostShape s{x.size(0), x.size(1), x.size(2), x.size(3), w_primary.size(0),
                     out_channels - w_primary.size(0), out_channels};
  at::Tensor y = at::empty({s.B, s.Cout, s.H, s.W}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const GhostExtras extras{input_scale.value_or(at::Tensor()), gate.value_or(at::Tensor()),
                           residual.value_or(at::Tensor())};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_conv_cpu", [&] {
    if (channels_last)
      ghost_conv_kernel<scalar_t, true>(x, w_primary, b_primary, w_cheap, b_cheap, relu_primary,
                                        relu_cheap, s, extras, y);
    else
      ghost_conv_kernel<scalar_t, false>(x, w_primary, b_primary, w_cheap, b_cheap,
                                         relu_primary, relu_cheap, s, extras, y);
  });
  return y;
}

struct DepthwiseShape {
  int64_t B, C, H, W, Ho, Wo, kh, kw, stride;
};

template <typename scalar_t, bool kChannelsLast>
void depthwise_conv_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           bool relu, const DepthwiseShape& s, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = s.B, C = s.C, H = s.H, W = s.W, Ho = s.Ho, Wo = s.Wo;
  const int64_t kh = s.kh, kw = s.kw, stride = s.stride, pad_h = kh / 2, pad_w = kw / 2;
  const std::vector<acc_t> wk = to_acc<acc_t, scalar_t>(weight);  // [C][kh*kw]
  const std::vector<acc_t> bk = to_acc<acc_t, scalar_t>(bias);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();

  if constexpr (kChannelsLast) {
    const std::vector<acc_t> wt = transposed(wk, C, kh * kw);  // [kh*kw][C]
    at::parallel_for(0, B * Ho, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sums(static_cast<size_t>(C));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / Ho, oh = task % Ho;
        for (int64_t ow = 0; ow < Wo; ++ow) {
          for (int64_t c = 0; c < C; ++c) sums[c] = bk[c];
          for (int64_t i = 0; i < kh; ++i) {
            const int64_t ih = oh * stride - pad_h + i;
            if (ih < 0 || ih >= H) continue;
            for (int64_t j = 0; j < kw; ++j) {
              const int64_t iw = ow * stride - pad_w + j;
              if (iw < 0 || iw >= W) continue;
              const scalar_t* in = xp + ((b * H + ih) * W + iw) * C;
              const acc_t* wtap = &wt[(i * kw + j) * C];
              for (int64_t c = 0; c < C; ++c) sums[c] += wtap[c] * static_cast<acc_t>(in[c]);
            }
          }
          scalar_t* out = yp + ((b * Ho + oh) * Wo + ow) * C;
          for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(activate(sums[c], relu));
        }
      }
    });
  } else {
    // NCHW: one channel's planes of a group of images at a time (depthwise_planes.h).
    namespace dp = depthwise_planes;
    const int64_t group = dp::planes_per_group(H, W, kh, kw, B);
    const int64_t groups = (B + group - 1) / group;
    at::parallel_for(0, C * groups, 1, [&](int64_t begin, int64_t end) {
      const dp::Geometry full(H, W, kh, kw, stride, group);
      std::vector<acc_t> buf(static_cast<size_t>(full.buffer_size()));
      std::vector<acc_t> acc(static_cast<size_t>(dp::forward_scratch(full)));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task / groups, b0 = (task % groups) * group;
        const dp::Geometry g(H, W, kh, kw, stride, std::min(group, B - b0));
        const int64_t plane = b0 * C + c;
        dp::fill_padded(g, xp + plane * H * W, C * H * W, buf.data());
        dp::forward(g, buf.data(), &wk[c * kh * kw], bk[c], relu, acc.data(),
                    yp + plane * Ho * Wo, C * Ho * Wo);
      }
    });
  }
}

at::Tensor depthwise_conv_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& bias, int64_t kh, int64_t kw,
                                      int64_t stride, bool relu) {
  const at::MemoryFormat fmt = check_depthwise_conv_inputs(x, weight, bias, kh, kw, stride);
  TORCH_CHECK(x.device().is_cpu(), "depthwise_conv_forward (CPU kernel): x must be a CPU tensor");
  const DepthwiseShape s{x.size(0), x.size(1), x.size(2), x.size(3),
                         depthwise_output_size(x.size(2), kh, stride),
                         depthwise_output_size(x.size(3), kw, stride), kh, kw, stride};
  at::Tensor y = at::empty({s.B, s.C, s.Ho, s.Wo}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv_cpu",
                                  [&] {
    if (channels_last)
      depthwise_conv_kernel<scalar_t, true>(x, weight, bias, relu, s, y);
    else
      depthwise_conv_kernel<scalar_t, false>(x, weight, bias, relu, s, y);
  });
  return y;
}

}  // namespace
}  // namespace ghostkernels

TORCH_LIBRARY_IMPL(ghostkernels_C, CPU, m) {
  m.impl("ghost_conv_forward", &ghostkernels::ghost_conv_forward_cpu);
  m.impl("depthwise_conv_forward", &ghostkernels::depthwise_conv_forward_cpu);
}
