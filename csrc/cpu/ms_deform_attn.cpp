// Multi-scale deformable attention, C++ CPU kernels (forward and backward).
//
// Semantics: for each (n, q, head m) the output is sum over levels l and points p of
// attention_weight * bilinear(value_l, x = loc_x * W_l - 0.5, y = loc_y * H_l - 0.5), with zero
// padding outside the map: exactly grid_sample(bilinear, zeros, align_corners=False). Half types
// are accumulated in float, float64 in double.
//
// softmax=true: attention_weights holds logits; each (n, q, m) turns its L*P logits into weights
// (subtract the max, exp, divide by the sum, in the accumulation type) before sampling, and the
// backward maps the gradient g w.r.t. the weights to the logits: w * (g - sum_k w_k g_k).
//
// Parallelism: forward over (n, q) blocks; backward over (n, head) pairs. Every (n, head) pair owns
// its slice grad_value[n, :, m, :] and the grad_loc/grad_attn entries of its queries, so the
// backward has no races and sums in a fixed order: it is deterministic by construction, which is
// why the CPU backward accepts and ignores fixed_point_scale (the CUDA kernels' deterministic mode).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "ms_deform_attn.h"

namespace ghostkernels {

namespace {

struct Level {
  int64_t h, w, start;
};

// Reads and validates the level metadata: positive sizes, start = running sum, sum = S.
std::vector<Level> read_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                               int64_t S) {
  const int64_t L = spatial_shapes.size(0);
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();
  std::vector<Level> levels(L);
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
    TORCH_CHECK(h >= 1 && w >= 1, "ms_deform_attn: spatial_shapes[", l, "] must be a positive (h, w), got (",
                h, ", ", w, ")");
    TORCH_CHECK(starts[l] == total, "ms_deform_attn: level_start_index[", l, "] must be ", total,
                " (running sum of h*w), got ", starts[l]);
    levels[l] = {h, w, total};
    total += h * w;
  }
  TORCH_CHECK(total == S, "ms_deform_attn: spatial_shapes describe ", total,
              " positions but value has S=", S);
  return levels;
}

// One sampling point in pixel space: its cell fractions and the value rows of its four corners
// (y0,x0) (y0,x1) (y1,x0) (y1,x1), -1 where a corner lies outside the map (zero padding).
template <typename acc_t>
struct Point {
  acc_t lx = 0, ly = 0;
  int64_t corner[4] = {-1, -1, -1, -1};
  bool any = false;  // some corner is inside the map

  acc_t weight(int k) const {
    const acc_t wy = (k & 2) ? ly : 1 - ly, wx = (k & 1) ? lx : 1 - lx;
    return wy * wx;
  }
};

template <typename acc_t>
Point<acc_t> locate(acc_t loc_x, acc_t loc_y, const Level& lv) {
  Point<acc_t> p;
  const acc_t x = loc_x * static_cast<acc_t>(lv.w) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(lv.h) - acc_t(0.5);
  // x == -1 still touches column 0 (with weight 0 but a non-zero gradient), as in grid_sample.
  // NaN fails every comparison and samples nothing.
  if (!(x >= -1 && x < lv.w && y >= -1 && y < lv.h)) return p;
  const acc_t fx = std::floor(x), fy = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(fx), y0 = static_cast<int64_t>(fy);
  p.lx = x - fx;
  p.ly = y - fy;
  p.any = true;
  const bool x0_in = x0 >= 0, x1_in = x0 + 1 < lv.w, y0_in = y0 >= 0, y1_in = y0 + 1 < lv.h;
  const int64_t row0 = lv.start + y0 * lv.w, row1 = row0 + lv.w;
  p.corner[0] = y0_in && x0_in ? row0 + x0 : -1;
  p.corner[1] = y0_in && x1_in ? row0 + x0 + 1 : -1;
  p.corner[2] = y1_in && x0_in ? row1 + x0 : -1;
  p.corner[3] = y1_in && x1_in ? row1 + x0 + 1 : -1;
  return p;
}

// The attention weights of one (n, q, m): the raw values, or the softmax of the logits over its
// count = L*P points (max subtracted first, so large logits cannot overflow; a NaN logit makes all
// weights NaN, as torch.softmax does).
template <typename scalar_t, typename acc_t>
void group_weights(const scalar_t* attn, int64_t count, bool softmax, acc_t* w) {
  for (int64_t i = 0; i < count; ++i) w[i] = static_cast<acc_t>(attn[i]);
  if (!softmax) return;
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < count; ++i) max = std::fmax(max, w[i]);
  acc_t sum = 0;
  for (int64_t i = 0; i < count; ++i) {
    w[i] = std::exp(w[i] - max);
    sum += w[i];
  }
  for (int64_t i = 0; i < count; ++i) w[i] /= sum;
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const scalar_t* value, const std::vector<Level>& levels, const acc_t* loc,
                    const scalar_t* attn, bool softmax, scalar_t* out, int64_t N, int64_t S,
                    int64_t M, int64_t D, int64_t Lq, int64_t P) {
  const int64_t L = static_cast<int64_t>(levels.size());
  const int64_t work_per_query = std::max<int64_t>(1, M * L * P * D);
  const int64_t grain = std::max<int64_t>(1, 16384 / work_per_query);
  at::parallel_for(0, N * Lq, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D), weights(L * P);
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / Lq;
      for (int64_t m = 0; m < M; ++m) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const int64_t group = nq * M + m;  // (n, q, m) in loc/attn order
        group_weights(attn + group * L * P, L * P, softmax, weights.data());
        for (int64_t l = 0; l < L; ++l) {
          for (int64_t p = 0; p < P; ++p) {
            const int64_t pt = (group * L + l) * P + p;
            const Point<acc_t> pnt = locate(loc[2 * pt], loc[2 * pt + 1], levels[l]);
            if (!pnt.any) continue;
            const acc_t a = weights[l * P + p];
            for (int k = 0; k < 4; ++k) {
              if (pnt.corner[k] < 0) continue;
              const acc_t w = a * pnt.weight(k);
              const scalar_t* row = value + ((n * S + pnt.corner[k]) * M + m) * D;
              for (int64_t c = 0; c < D; ++c) acc[c] += w * static_cast<acc_t>(row[c]);
            }
          }
        }
        scalar_t* dst = out + group * D;
        for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const scalar_t* grad_out, const scalar_t* value, const std::vector<Level>& levels,
                     const acc_t* loc, const scalar_t* attn, bool softmax, acc_t* grad_value,
                     acc_t* grad_loc, acc_t* grad_attn, int64_t N, int64_t S, int64_t M, int64_t D,
                     int64_t Lq, int64_t P) {
  const int64_t L = static_cast<int64_t>(levels.size());
  at::parallel_for(0, N * M, 1, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zero_row(D, scalar_t(0));
    std::vector<acc_t> weights(L * P);
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / M, m = nm % M;
      for (int64_t q = 0; q < Lq; ++q) {
        const int64_t group = (n * Lq + q) * M + m;
        const scalar_t* go = grad_out + group * D;
        group_weights(attn + group * L * P, L * P, softmax, weights.data());
        for (int64_t l = 0; l < L; ++l) {
          const Level& lv = levels[l];
          for (int64_t p = 0; p < P; ++p) {
            const int64_t pt = (group * L + l) * P + p;
            const Point<acc_t> pnt = locate(loc[2 * pt], loc[2 * pt + 1], lv);
            grad_loc[2 * pt] = grad_loc[2 * pt + 1] = grad_attn[pt] = acc_t(0);
            if (!pnt.any) continue;
            const acc_t a = weights[l * P + p];
            const scalar_t* v[4];
            acc_t w[4];
            for (int k = 0; k < 4; ++k) {
              v[k] = pnt.corner[k] < 0 ? zero_row.data()
                                       : value + ((n * S + pnt.corner[k]) * M + m) * D;
              w[k] = pnt.weight(k);
            }
            const acc_t hx = 1 - pnt.lx, hy = 1 - pnt.ly;
            acc_t g_attn = 0, g_lx = 0, g_ly = 0;
            for (int64_t c = 0; c < D; ++c) {
              const acc_t g = static_cast<acc_t>(go[c]);
              const acc_t v0 = static_cast<acc_t>(v[0][c]), v1 = static_cast<acc_t>(v[1][c]);
              const acc_t v2 = static_cast<acc_t>(v[2][c]), v3 = static_cast<acc_t>(v[3][c]);
              g_attn += g * (w[0] * v0 + w[1] * v1 + w[2] * v2 + w[3] * v3);
              g_lx += g * (hy * (v1 - v0) + pnt.ly * (v3 - v2));
              g_ly += g * (hx * (v2 - v0) + pnt.lx * (v3 - v1));
            }
            for (int k = 0; k < 4; ++k) {
              if (pnt.corner[k] < 0) continue;
              const acc_t aw = a * w[k];
              acc_t* gv = grad_value + ((n * S + pnt.corner[k]) * M + m) * D;
              for (int64_t c = 0; c < D; ++c) gv[c] += aw * static_cast<acc_t>(go[c]);
            }
            grad_attn[pt] = g_attn;
            grad_loc[2 * pt] = a * static_cast<acc_t>(lv.w) * g_lx;
            grad_loc[2 * pt + 1] = a * static_cast<acc_t>(lv.h) * g_ly;
          }
        }
        if (softmax) {  // grad_attn holds g (w.r.t. the weights): map it to the logits
          acc_t* g = grad_attn + group * L * P;
          acc_t dot = 0;
          for (int64_t i = 0; i < L * P; ++i) dot += weights[i] * g[i];
          for (int64_t i = 0; i < L * P; ++i) g[i] = weights[i] * (g[i] - dot);
        }
      }
    }
  });
}

at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, bool softmax) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights, nullptr);
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1), P = sampling_locations.size(4);
  const std::vector<Level> levels = read_levels(spatial_shapes, level_start_index, S);
  at::Tensor out = at::empty({N, Lq, M * D}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "ms_deform_attn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(value.const_data_ptr<scalar_t>(), levels,
                                    sampling_locations.const_data_ptr<acc_t>(),
                                    attention_weights.const_data_ptr<scalar_t>(), softmax,
                                    out.mutable_data_ptr<scalar_t>(), N, S, M, D, Lq, P);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool softmax,
    const std::optional<at::Tensor>& fixed_point_scale) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights, &grad_output);
  // Checked for a clear error on misuse, then ignored: this backward is deterministic as it is.
  check_fixed_point_scale(fixed_point_scale, value);
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1), P = sampling_locations.size(4);
  const std::vector<Level> levels = read_levels(spatial_shapes, level_start_index, S);
  // Gradients in the accumulation dtype (float for half types); the op layer casts them.
  const auto acc_options = value.options().dtype(accumulation_type(value.scalar_type()));
  at::Tensor grad_value = at::zeros(value.sizes(), acc_options);
  at::Tensor grad_loc = at::zeros(sampling_locations.sizes(), acc_options);
  at::Tensor grad_attn = at::zeros(attention_weights.sizes(), acc_options);
  if (grad_loc.numel() == 0 || D == 0) return {grad_value, grad_loc, grad_attn};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "ms_deform_attn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, acc_t>(
        grad_output.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(), levels,
        sampling_locations.const_data_ptr<acc_t>(), attention_weights.const_data_ptr<scalar_t>(),
        softmax, grad_value.mutable_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<acc_t>(),
        grad_attn.mutable_data_ptr<acc_t>(), N, S, M, D, Lq, P);
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostkernels_C, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace ghostkernels
