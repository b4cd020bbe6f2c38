"""ms_deform_attn on the compiled extension (C++ CPU and CUDA C++ kernels)."""
import torch

from ghostkernels.backends import compiled_extension


def _ops():
    compiled_extension()  # loading the library registers torch.ops.ghostkernels_C
    return torch.ops.ghostkernels_C


def forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return _ops().ms_deform_attn_forward(value, spatial_shapes, level_start_index,
                                         sampling_locations, attention_weights)


def backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
             attention_weights):
    return tuple(_ops().ms_deform_attn_backward(grad_output, value, spatial_shapes,
                                                level_start_index, sampling_locations,
                                                attention_weights))
