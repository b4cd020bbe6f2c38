// Contract checks shared by the CPU and CUDA kernels of ms_deform_attn (defined in
// csrc/ms_deform_attn.cpp). The Python op layer gives the friendly errors; these TORCH_CHECKs are
// defence in depth for direct torch.ops calls.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace ghostkernels {

// Shape, dtype, device and layout checks; grad_output is checked too when not null.
void check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights,
                                 const at::Tensor* grad_output);

// The deterministic backward's scale, when given: a 0-d float64 tensor on value's device.
void check_fixed_point_scale(const std::optional<at::Tensor>& fixed_point_scale,
                             const at::Tensor& value);

}  // namespace ghostkernels
