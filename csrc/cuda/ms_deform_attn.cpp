// Multi-scale deformable attention, CUDA host side: checks the tensors, allocates the outputs and
// launches the torch-free kernels of ms_deform_attn_kernel.cu on the current stream. No host
// synchronisation (capturable in a CUDA graph); the level metadata and the fixed-point scale stay
// on the device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/launch_checks.h"
#include "cuda/ms_deform_attn_kernel.h"

#include "ms_deform_attn.h"

namespace ghostkernels {

namespace {

msda_cuda::ValueType value_type(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return msda_cuda::ValueType::kFloat64;
    case at::kFloat: return msda_cuda::ValueType::kFloat32;
    case at::kHalf: return msda_cuda::ValueType::kFloat16;
    case at::kBFloat16: return msda_cuda::ValueType::kBFloat16;
    default: TORCH_CHECK(false, "ms_deform_attn (CUDA): unsupported value dtype ", t);
  }
}

msda_cuda::Sizes sizes_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  msda_cuda::Sizes sz;
  sz.N = value.size(0);
  sz.S = value.size(1);
  sz.M = value.size(2);
  sz.D = value.size(3);
  sz.Lq = sampling_locations.size(1);
  sz.L = sampling_locations.size(3);
  sz.P = sampling_locations.size(4);
  return sz;
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights, bool softmax) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights, nullptr);
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (CUDA): value must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(value.device());
  const msda_cuda::Sizes sz = sizes_of(value, sampling_locations);
  at::Tensor out = at::empty({sz.N, sz.Lq, sz.M * sz.D}, value.options());
  if (out.numel() == 0) return out;
  check_launch(msda_cuda::forward(value_type(value.scalar_type()), sz, value.const_data_ptr(),
                                  spatial_shapes.const_data_ptr<int64_t>(),
                                  level_start_index.const_data_ptr<int64_t>(),
                                  sampling_locations.const_data_ptr(),
                                  attention_weights.const_data_ptr(), softmax,
                                  out.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
               "ms_deform_attn_forward");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool softmax,
    const std::optional<at::Tensor>& fixed_point_scale) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights, &grad_output);
  check_fixed_point_scale(fixed_point_scale, value);
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (CUDA): value must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(value.device());
  const msda_cuda::Sizes sz = sizes_of(value, sampling_locations);
  // The kernel adds into zero-filled buffers of the accumulation dtype (float for half types);
  // the op layer casts them to the input dtypes.
  const auto acc_dtype = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = value.options().dtype(acc_dtype);
  at::Tensor grad_loc = at::zeros(sampling_locations.sizes(), acc_options);
  at::Tensor grad_attn = at::zeros(attention_weights.sizes(), acc_options);
  if (grad_loc.numel() == 0 || value.numel() == 0)
    return {at::zeros(value.sizes(), acc_options), grad_loc, grad_attn};
  // Deterministic mode: grad_value is summed in int64 fixed point (integer atomics), then scaled
  // back in float64 on the stream: sum / scale, cast to the accumulation dtype.
  const bool fixed_point = fixed_point_scale.has_value() && fixed_point_scale->defined();
  at::Tensor grad_value_sum =
      at::zeros(value.sizes(), fixed_point ? value.options().dtype(at::kLong) : acc_options);
  check_launch(msda_cuda::backward(value_type(value.scalar_type()), sz,
                                   grad_output.const_data_ptr(), value.const_data_ptr(),
                                   spatial_shapes.const_data_ptr<int64_t>(),
                                   level_start_index.const_data_ptr<int64_t>(),
                                   sampling_locations.const_data_ptr(),
                                   attention_weights.const_data_ptr(), softmax,
                                   fixed_point ? fixed_point_scale->const_data_ptr<double>() : nullptr,
                                   grad_value_sum.mutable_data_ptr(), grad_loc.mutable_data_ptr(),
                                   grad_attn.mutable_data_ptr(),
                                   c10::cuda::getCurrentCUDAStream().stream()),
               "ms_deform_attn_backward");
  if (!fixed_point) return {grad_value_sum, grad_loc, grad_attn};
  at::Tensor grad_value = grad_value_sum.to(at::kDouble).div_(*fixed_point_scale).to(acc_dtype);
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostkernels_C, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace ghostkernels
