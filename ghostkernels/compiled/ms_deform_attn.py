"""ms_deform_attn on the compiled extension (C++ CPU and CUDA C++ kernels)."""
import torch

from ghostkernels.backends import compiled_extension


def _ops():
    compiled_extension()  # loading the library registers torch.ops.ghostkernels_C
    return torch.ops.ghostkernels_C


def forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            softmax=False):
    return _ops().ms_deform_attn_forward(value, spatial_shapes, level_start_index,
                                         sampling_locations, attention_weights, softmax)


def backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
             attention_weights, softmax=False, fixed_point_scale=None):
    """fixed_point_scale: None, or a 0-d float64 tensor on value's device that selects the CUDA
    kernels' deterministic (int64 fixed-point) grad_value; the CPU kernels ignore it (they are
    deterministic by construction)."""
    return tuple(_ops().ms_deform_attn_backward(grad_output, value, spatial_shapes,
                                                level_start_index, sampling_locations,
                                                attention_weights, softmax, fixed_point_scale))
