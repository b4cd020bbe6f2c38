"""depthwise_conv on the compiled extension (C++ CPU and CUDA C++ kernels).

Kernel contract: see ``ghostkernels/ops/depthwise_conv.py`` (x [B,C,H,W] dense in NCHW or
channels_last; weight [C, kh*kw] contiguous, bias [C]; kh, kw in {1,3,5}; stride 1 or 2; padding
(kh//2, kw//2)) -> y [B,C,Ho,Wo] in x's memory format.
"""
import torch

from ghostkernels.backends import compiled_extension
from ghostkernels.reference import depthwise_conv as reference
from ghostkernels.reference.ghost_conv import output_memory_format


def _ops():
    compiled_extension()  # loading the library registers torch.ops.ghostkernels_C
    return torch.ops.ghostkernels_C


def forward(x, weight, bias, kh: int, kw: int, stride: int, relu: bool):
    return _ops().depthwise_conv_forward(x, weight, bias, int(kh), int(kw), int(stride),
                                         bool(relu))


def backward(grad_y, y, x, weight, kh: int, kw: int, stride: int, relu: bool,
             needs=(True, True, True)):
    """(grad_x, grad_weight [C, kh*kw], grad_bias), None where ``needs`` is False: the C++ CPU
    kernel for CPU tensors (float64 sums for float64, float32 otherwise), the reference formula
    (cuDNN/ATen) for CUDA tensors, which have no backward kernel here."""
    if x.device.type != "cpu":
        return reference.backward(grad_y, y, x, weight, kh, kw, stride, relu, needs)
    # x is the tensor autograd saved, as the caller passed it: it may be sliced, transposed or
    # expanded, while the kernel takes x dense in NCHW or channels_last (the forward's layout).
    x = x.contiguous(memory_format=output_memory_format(x))
    grads = _ops().depthwise_conv_backward(
        grad_y.to(x.dtype), x, weight.contiguous(), y if relu else None, int(kh), int(kw),
        int(stride), bool(needs[0]), bool(needs[1]), bool(needs[2]))
    return tuple(g if need else None for g, need in zip(grads, needs))
