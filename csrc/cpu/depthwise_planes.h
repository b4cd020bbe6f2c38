// Depthwise convolution of a group of NCHW planes that share one filter (one channel of several
// images), kernel kh x kw (odd), zero padding (kh/2, kw/2), stride 1 or 2, forward and backward,
// as a few long contiguous loops.
//
// The planes are copied once into a zero-padded buffer, stacked one above the other. With
// stride 2 the buffer is split into four phase planes (padded row parity x column parity). Then
// every tap of either stride reads (or, in the backward, writes) the buffer at the output's flat
// position k = (plane * rows + oh) * pitch + ow plus a constant tap offset, and a tap is ONE loop
// `acc[k] += w * src[k + offset]` over all the group's output positions; positions with
// ow >= Wo or oh >= Ho are scratch, never stored. On the small maps of a lightweight backbone
// (3x3 ... 48x48, where oneDNN's per-call reorders and short per-row loops cost more than the
// arithmetic) this turns dozens of short loops per plane into kh*kw long ones per group.
//
//   forward:      y[k]            = bias + sum_t w_t * xbuf[off_t + k]
//   grad input:   dxbuf[off_t + k] += w_t * g[k]          (dx = the interior of dxbuf)
//   grad weight:  dw_t            += sum_k g[k] * xbuf[off_t + k]
//   grad bias:    db              += sum_k g[k]
// with g the output gradient laid out like y's positions (zero at the scratch positions, and
// zero where a ReLU output was not positive).
//
// Free of torch headers: the kernels take raw pointers; acc_t is float or double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace ghostkernels::depthwise_planes {

struct Geometry {
  int64_t H, W, Ho, Wo, kh, kw, stride, planes;
  int64_t rows, pitch;  // per plane of each phase (one phase for stride 1, four for stride 2)
  int64_t n;            // flat positions up to the last output: ((planes-1)*rows + Ho-1)*pitch + Wo

  Geometry(int64_t H_, int64_t W_, int64_t kh_, int64_t kw_, int64_t stride_, int64_t planes_)
      : H(H_), W(W_), kh(kh_), kw(kw_), stride(stride_), planes(planes_) {
    const int64_t Hp = H + 2 * (kh / 2), Wp = W + 2 * (kw / 2);
    Ho = (Hp - kh) / stride + 1;
    Wo = (Wp - kw) / stride + 1;
    rows = stride == 1 ? Hp : (Hp + 1) / 2;
    pitch = stride == 1 ? Wp : (Wp + 1) / 2;
    n = ((planes - 1) * rows + Ho - 1) * pitch + Wo;
  }
  int64_t phase_size() const { return planes * rows * pitch; }
  int64_t buffer_size() const { return stride * stride * phase_size(); }
  // Where padded position (r, q) of plane p lives in the buffer.
  int64_t index(int64_t p, int64_t r, int64_t q) const {
    if (stride == 1) return (p * rows + r) * pitch + q;
    return ((r & 1) * 2 + (q & 1)) * phase_size() + (p * rows + (r >> 1)) * pitch + (q >> 1);
  }
  // Tap (i, j) of output position k reads/writes buffer[tap_offset(i, j) + k].
  int64_t tap_offset(int64_t i, int64_t j) const { return index(0, i, j); }
};

// Planes per group: the group's buffer stays within ~kGroupElems values (L2-sized).
constexpr int64_t kGroupElems = 1 << 16;

inline int64_t planes_per_group(int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t total) {
  const int64_t plane = (H + 2 * (kh / 2) + 1) * (W + 2 * (kw / 2) + 1);
  return std::clamp<int64_t>(kGroupElems / std::max<int64_t>(plane, 1), 1, total);
}

// out[k] = init + sum_t w[t] * src[k + off[t]] for k in [0, n): a block of V outputs stays in
// registers while every tap adds to it (one vector load per tap and block, one store per block).
template <typename acc_t>
inline void correlate(acc_t* __restrict out, const acc_t* __restrict src, const int64_t* off,
                      const acc_t* w, int64_t taps, int64_t n, acc_t init) {
  constexpr int V = 64 / sizeof(acc_t);
  int64_t k = 0;
  for (; k + V <= n; k += V) {
    acc_t a[V];
    for (int l = 0; l < V; ++l) a[l] = init;
    for (int64_t t = 0; t < taps; ++t) {
      const acc_t* s = src + off[t] + k;
      const acc_t wt = w[t];
      for (int l = 0; l < V; ++l) a[l] += wt * s[l];
    }
    for (int l = 0; l < V; ++l) out[k + l] = a[l];
  }
  for (; k < n; ++k) {
    acc_t a = init;
    for (int64_t t = 0; t < taps; ++t) a += w[t] * src[off[t] + k];
    out[k] = a;
  }
}

// sum_k a[k] * b[k] in eight independent partial sums (vectorisable without reassociation).
template <typename acc_t>
inline acc_t dot(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  acc_t part[8] = {};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int l = 0; l < 8; ++l) part[l] += a[k + l] * b[k + l];
  acc_t sum = 0;
  for (; k < n; ++k) sum += a[k] * b[k];
  for (int l = 0; l < 8; ++l) sum += part[l];
  return sum;
}

// Calls f(plane, h, w0, step, buffer offset of (h, w0)) for each input row h of each plane and
// each padded column parity (stride 2; one run per row for stride 1): the row's columns
// w0, w0 + step, ... sit at consecutive buffer positions from that offset.
template <typename F>
inline void for_each_input_run(const Geometry& g, F&& f) {
  const int64_t ph = g.kh / 2, pw = g.kw / 2;
  for (int64_t p = 0; p < g.planes; ++p)
    for (int64_t h = 0; h < g.H; ++h) {
      if (g.stride == 1) {
        f(p, h, int64_t(0), int64_t(1), g.index(p, h + ph, pw));
      } else {
        for (int64_t parity = 0; parity < 2; ++parity) {
          const int64_t w0 = ((parity - pw) % 2 + 2) % 2;  // first w with (w + pw) % 2 == parity
          if (w0 < g.W) f(p, h, w0, int64_t(2), g.index(p, h + ph, w0 + pw));
        }
      }
    }
}

// buf (buffer_size()) = the group's zero-padded planes; plane p is x + p * plane_stride [H][W].
template <typename in_t, typename acc_t>
void fill_padded(const Geometry& g, const in_t* x, int64_t plane_stride, acc_t* buf) {
  std::fill(buf, buf + g.buffer_size(), acc_t(0));
  for_each_input_run(g, [&](int64_t p, int64_t h, int64_t w0, int64_t step, int64_t at) {
    const in_t* row = x + p * plane_stride + h * g.W;
    acc_t* out = buf + at;
    for (int64_t w = w0, t = 0; w < g.W; w += step, ++t) out[t] = static_cast<acc_t>(row[w]);
  });
}

// Output rows (global: plane * rows + oh) per block of the forward: acc spans at most
// ~kBlockElems values (L1-sized).
constexpr int64_t kBlockElems = 4096;

// acc values the forward needs.
inline int64_t forward_scratch(const Geometry& g) {
  const int64_t rows = std::max<int64_t>(1, kBlockElems / g.pitch);
  return std::min(g.n, rows * g.pitch);
}

// Plane p of y (y + p * plane_stride, [Ho][Wo]) = act(bias + depthwise conv of plane p of xbuf);
// acc holds forward_scratch(g) values.
template <typename out_t, typename acc_t>
void forward(const Geometry& g, const acc_t* xbuf, const acc_t* w, acc_t bias, bool relu,
             acc_t* acc, out_t* y, int64_t plane_stride) {
  int64_t off[25];
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) off[i * g.kw + j] = g.tap_offset(i, j);
  const int64_t block = std::max<int64_t>(1, kBlockElems / g.pitch);
  const int64_t last_row = (g.planes - 1) * g.rows + g.Ho;  // one past the last output row
  for (int64_t r0 = 0; r0 < last_row; r0 += block) {
    const int64_t r1 = std::min(last_row, r0 + block);
    const int64_t base = r0 * g.pitch, len = (r1 - 1 - r0) * g.pitch + g.Wo;
    correlate(acc, xbuf + base, off, w, g.kh * g.kw, len, bias);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t p = r / g.rows, oh = r % g.rows;
      if (oh >= g.Ho) continue;
      const acc_t* a = acc + (r - r0) * g.pitch;
      out_t* out = y + p * plane_stride + oh * g.Wo;
      if (relu) {
        for (int64_t ow = 0; ow < g.Wo; ++ow)
          out[ow] = static_cast<out_t>(std::max(a[ow], acc_t(0)));
      } else {
        for (int64_t ow = 0; ow < g.Wo; ++ow) out[ow] = static_cast<out_t>(a[ow]);
      }
    }
  }
}

// The largest offset of a tap inside its phase plane: the zero lead of the gradient buffer.
inline int64_t grad_lead(const Geometry& g) {
  const int64_t i = g.kh - 1, j = g.kw - 1;
  return g.stride == 1 ? i * g.pitch + j : (i >> 1) * g.pitch + (j >> 1);
}

// Values of the gradient buffer: the lead, then one phase plane.
inline int64_t grad_buffer_size(const Geometry& g) { return grad_lead(g) + g.phase_size(); }

// gbuf (grad_buffer_size()) = zeros, with the group's output gradient (plane p: grad_y +
// p * plane_stride, [Ho][Wo]) at gbuf[grad_lead + k] for its output positions k, except where y
// is given (a ReLU forward; same layout as grad_y) and y <= 0.
template <typename in_t, typename acc_t>
void pitched_grad(const Geometry& g, const in_t* grad_y, const in_t* y, int64_t plane_stride,
                  acc_t* gbuf) {
  std::fill(gbuf, gbuf + grad_buffer_size(g), acc_t(0));
  acc_t* gp = gbuf + grad_lead(g);
  for (int64_t p = 0; p < g.planes; ++p)
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      const int64_t from = p * plane_stride + oh * g.Wo;
      acc_t* dst = gp + (p * g.rows + oh) * g.pitch;
      const in_t* src = grad_y + from;
      if (y) {
        const in_t* yr = y + from;
        for (int64_t ow = 0; ow < g.Wo; ++ow)
          dst[ow] = static_cast<acc_t>(yr[ow]) > acc_t(0) ? static_cast<acc_t>(src[ow]) : acc_t(0);
      } else {
        for (int64_t ow = 0; ow < g.Wo; ++ow) dst[ow] = static_cast<acc_t>(src[ow]);
      }
    }
}

// The group's grad_x (plane p: grad_x + p * plane_stride, [H][W]) from gbuf; dbuf is scratch of
// buffer_size(). Each phase plane gathers from the taps of its parity:
// dbuf_phase[m] = sum_t w_t * gp[m - o_t], o_t the tap's offset inside the phase plane.
template <typename out_t, typename acc_t>
void grad_input(const Geometry& g, const acc_t* gbuf, const acc_t* w, acc_t* dbuf, out_t* grad_x,
                int64_t plane_stride) {
  const int64_t lead = grad_lead(g);
  for (int64_t phase = 0; phase < g.stride * g.stride; ++phase) {
    int64_t off[25];
    acc_t wt[25];
    int64_t taps = 0;
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) {
        if (g.stride == 2 && ((i & 1) * 2 + (j & 1)) != phase) continue;
        const int64_t o = g.stride == 1 ? i * g.pitch + j : (i >> 1) * g.pitch + (j >> 1);
        off[taps] = lead - o;
        wt[taps++] = w[i * g.kw + j];
      }
    correlate(dbuf + phase * g.phase_size(), gbuf, off, wt, taps, g.phase_size(), acc_t(0));
  }
  for_each_input_run(g, [&](int64_t p, int64_t h, int64_t w0, int64_t step, int64_t at) {
    out_t* row = grad_x + p * plane_stride + h * g.W;
    const acc_t* in = dbuf + at;
    for (int64_t x = w0, t = 0; x < g.W; x += step, ++t) row[x] = static_cast<out_t>(in[t]);
  });
}

// Whether buf[0, n) holds no inf or NaN (|x| <= max is false for both). An integer OR
// reduction: it vectorises (a float sum would not, without reassociation), ~1/4 of one dot.
template <typename acc_t>
inline bool all_finite(const acc_t* buf, int64_t n) {
  unsigned bad = 0;
  for (int64_t k = 0; k < n; ++k)
    bad |= !(std::abs(buf[k]) <= std::numeric_limits<acc_t>::max());
  return bad == 0;
}

// dw[t] += sum_k gp[k] * xbuf[off_t + k] for every tap t; returns sum_k gp[k] (the bias term).
// The long dot products also pair the zero gradient of each scratch position with the input
// value the tap reaches there, an input the tap never sees at a real output: harmless for
// finite inputs, but 0 * inf = NaN. With an inf or NaN in xbuf the sums run over the output
// rows only, so a tap's gradient is non-finite only where the reference's is.
template <typename acc_t>
acc_t accumulate_grad_weight(const Geometry& g, const acc_t* gbuf, const acc_t* xbuf, acc_t* dw) {
  const acc_t* gp = gbuf + grad_lead(g);
  const bool long_dots = all_finite(xbuf, g.buffer_size());
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      const acc_t* xs = xbuf + g.tap_offset(i, j);
      if (long_dots) {
        dw[i * g.kw + j] += dot(gp, xs, g.n);
        continue;
      }
      for (int64_t p = 0; p < g.planes; ++p)
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          const int64_t k = (p * g.rows + oh) * g.pitch;
          dw[i * g.kw + j] += dot(gp + k, xs + k, g.Wo);
        }
    }
  acc_t sum = 0;
  for (int64_t k = 0; k < g.n; ++k) sum += gp[k];
  return sum;
}

}  // namespace ghostkernels::depthwise_planes
