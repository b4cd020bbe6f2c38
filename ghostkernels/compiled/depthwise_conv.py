"""depthwise_conv on the compiled extension (C++ CPU and CUDA C++ kernels).

Kernel contract: see ``ghostkernels/ops/depthwise_conv.py`` (x [B,C,H,W] dense in NCHW or
channels_last; weight [C, kh*kw] contiguous, bias [C]; kh, kw in {1,3,5}; stride 1 or 2; padding
(kh//2, kw//2)) -> y [B,C,Ho,Wo] in x's memory format.
"""
import torch

from ghostkernels.backends import compiled_extension


def _ops():
    compiled_extension()  # loading the library registers torch.ops.ghostkernels_C
    return torch.ops.ghostkernels_C


def forward(x, weight, bias, kh: int, kw: int, stride: int, relu: bool):
    return _ops().depthwise_conv_forward(x, weight, bias, int(kh), int(kw), int(stride),
                                         bool(relu))
