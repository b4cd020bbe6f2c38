// Multi-scale deformable attention: operator schemas and the argument checks that every backend
// (csrc/cpu, csrc/cuda) runs before touching memory.
//
// The Python op layer (ghostkernels/ops/ms_deform_attn.py) gives the friendly errors; these checks
// are the defence in depth that keeps a direct call of torch.ops.ghostkernels_C.* from reading out
// of bounds. Kernel contract: all tensors contiguous on one device; value [N,S,M,D] dtype T;
// spatial_shapes [L,2] int64 (h, w); level_start_index [L] int64; sampling_locations
// [N,Lq,M,L,P,2] float64 when T is float64 else float32; attention_weights [N,Lq,M,L,P] dtype T;
// grad_output [N,Lq,M*D] dtype T.
//
// softmax=true: attention_weights holds logits; the kernels apply the softmax over the L*P points of
// each (n, q, m) in the accumulation dtype (forward), and the backward's third result is the
// gradient w.r.t. the logits. fixed_point_scale (backward only; a 0-d float64 tensor on value's
// device): the deterministic mode of the CUDA kernels, which accumulate grad_value in int64 fixed
// point with that scale; the CPU kernels are deterministic by construction and ignore it.
#include <torch/library.h>

#include "ms_deform_attn.h"
#include <ATen/core/Tensor.h>

namespace ghostkernels {

namespace {

void check_contiguous_on(const at::Tensor& t, const char* name, const at::Tensor& value) {
  TORCH_CHECK(t.defined(), "ms_deform_attn: ", name, " is undefined");
  TORCH_CHECK(t.device() == value.device(), "ms_deform_attn: ", name, " must be on value's device (",
              value.device(), "), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "ms_deform_attn: ", name, " must be contiguous");
}

}  // namespace

// Shape, dtype, device and layout checks shared by the CPU and CUDA kernels. Value-dependent checks
// of the level metadata (positive sizes, start index = running sum, sum = S) need a host read: the
// CPU kernel does them, the CUDA kernels skip inconsistent levels instead (no host sync).
void check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights,
                                 const at::Tensor* grad_output) {
  TORCH_CHECK(value.defined(), "ms_deform_attn: value is undefined");
  TORCH_CHECK(value.is_contiguous(), "ms_deform_attn: value must be contiguous");
  check_contiguous_on(spatial_shapes, "spatial_shapes", value);
  check_contiguous_on(level_start_index, "level_start_index", value);
  check_contiguous_on(sampling_locations, "sampling_locations", value);
  check_contiguous_on(attention_weights, "attention_weights", value);

  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [N, S, M, D], got shape ",
              value.sizes());
  const auto T = value.scalar_type();
  TORCH_CHECK(T == at::kDouble || T == at::kFloat || T == at::kHalf || T == at::kBFloat16,
              "ms_deform_attn: value must be float64/float32/float16/bfloat16, got ", T);
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3);

  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be [L, 2], got shape ", spatial_shapes.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes must be int64, got ", spatial_shapes.scalar_type());
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(L >= 1 && L <= 1024, "ms_deform_attn: spatial_shapes must describe 1..1024 levels, got ",
              L);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "ms_deform_attn: level_start_index must be [L] = [", L, "], got shape ",
              level_start_index.sizes());
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: level_start_index must be int64, got ",
              level_start_index.scalar_type());

  const auto loc_dtype = T == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(sampling_locations.scalar_type() == loc_dtype, "ms_deform_attn: sampling_locations must be ",
              loc_dtype, " for value dtype ", T, ", got ", sampling_locations.scalar_type());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(0) == N &&
                  sampling_locations.size(2) == M && sampling_locations.size(3) == L &&
                  sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2] with N=", N, " M=", M,
              " L=", L, ", got shape ", sampling_locations.sizes());
  const int64_t Lq = sampling_locations.size(1), P = sampling_locations.size(4);

  TORCH_CHECK(attention_weights.scalar_type() == T, "ms_deform_attn: attention_weights must be ", T,
              " (value's dtype), got ", attention_weights.scalar_type());
  TORCH_CHECK(attention_weights.sizes() == at::IntArrayRef({N, Lq, M, L, P}),
              "ms_deform_attn: attention_weights must be [N, Lq, M, L, P] = [", N, ", ", Lq, ", ", M,
              ", ", L, ", ", P, "], got shape ", attention_weights.sizes());

  if (grad_output != nullptr) {
    check_contiguous_on(*grad_output, "grad_output", value);
    TORCH_CHECK(grad_output->scalar_type() == T, "ms_deform_attn: grad_output must be ", T,
                " (value's dtype), got ", grad_output->scalar_type());
    TORCH_CHECK(grad_output->sizes() == at::IntArrayRef({N, Lq, M * D}),
                "ms_deform_attn: grad_output must be [N, Lq, M*D] = [", N, ", ", Lq, ", ", M * D,
                "], got shape ", grad_output->sizes());
  }
}

void check_fixed_point_scale(const std::optional<at::Tensor>& fixed_point_scale,
                             const at::Tensor& value) {
  if (!fixed_point_scale.has_value() || !fixed_point_scale->defined()) return;
  const at::Tensor& scale = *fixed_point_scale;
  TORCH_CHECK(scale.dim() == 0, "ms_deform_attn: fixed_point_scale must be a 0-d tensor, got shape ",
              scale.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kDouble,
              "ms_deform_attn: fixed_point_scale must be float64, got ", scale.scalar_type());
  TORCH_CHECK(scale.device() == value.device(),
              "ms_deform_attn: fixed_point_scale must be on value's device (", value.device(),
              "), got ", scale.device());
}

}  // namespace ghostkernels

TORCH_LIBRARY_FRAGMENT(ghostkernels_C, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, bool softmax=False) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights, "
      "bool softmax=False, Tensor? fixed_point_scale=None) -> (Tensor, Tensor, Tensor)");
}
