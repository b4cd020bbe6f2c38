"""Convolution + ReLU as one cuDNN call where that is possible, for the reference backend (the
automatic choice of the Ghost ops on CUDA) and for plain folded convs of models on the fused path.
"""
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair


def fuses_relu(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    """Whether :func:`conv2d_relu` runs one cuDNN call for these tensors: CUDA float16/float32
    (cuDNN's fused conv-bias-activation has no bfloat16), a bias, no autograd recording and no
    compiler tracing (the fused call has no backward formula, and inductor fuses the pair
    itself)."""
    return (x.is_cuda and x.dtype in (torch.float16, torch.float32) and weight.dtype == x.dtype
            and bias is not None and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and torch.backends.cudnn.enabled
            and torch.backends.cudnn.is_available())


def conv2d_relu(x: torch.Tensor, weight: torch.Tensor, bias, stride=1, padding=0, dilation=1,
                groups: int = 1) -> torch.Tensor:
    """``relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))`` (padding: ints):
    where :func:`fuses_relu`, one ``torch.cudnn_convolution_relu`` with the ReLU in the
    convolution's epilogue, so the output is written once instead of written, read and written
    again; elsewhere the two plain ops."""
    if fuses_relu(x, weight, bias):
        return torch.cudnn_convolution_relu(x, weight, bias, _pair(stride), _pair(padding),
                                            _pair(dilation), groups)
    return torch.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))
