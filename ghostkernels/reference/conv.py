"""Convolutions of the reference backend (the automatic choice of the Ghost ops on CUDA) that
avoid passes over memory: convolution + ReLU as one cuDNN call where possible (also for plain
folded convs of models on the fused path), and the 1x1 conv of an SE-scaled input as one batched
matrix product with the scale in the weights.
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


def scale_input(x: torch.Tensor, input_scale) -> torch.Tensor:
    """x * input_scale[:, :, None, None] (x itself for None), in x's dtype."""
    if input_scale is None:
        return x
    return x * input_scale.to(x.dtype)[:, :, None, None]


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool,
                   input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``act(conv1x1(x * input_scale[:, :, None, None], weight) + bias)``; weight [Cout, Cin],
    bias [Cout], input_scale [B, Cin] or None, all of x's dtype.

    Without a scale: :func:`conv2d_relu` or one ``F.conv2d``. With one, the scale goes into a
    weight per image (``weight * input_scale[b]``, [B, Cout, Cin]: a few KB) and the convolution
    becomes one batched matrix product over x in its own layout (NCHW: [B, Cin, H*W];
    channels_last: [B, H*W, Cin]), with the bias added by ``baddbmm``: x is read once and the
    scaled x, as large as x, is never written. Other layouts scale x first."""
    Cout, Cin = weight.shape
    if input_scale is None:
        w = weight.view(Cout, Cin, 1, 1)
        return conv2d_relu(x, w, bias) if relu else F.conv2d(x, w, bias)
    B, _, H, W = x.shape
    per_image = weight[None] * input_scale.to(weight.dtype)[:, None, :]  # [B, Cout, Cin]
    if x.is_contiguous():
        y = torch.baddbmm(bias.view(1, Cout, 1), per_image, x.view(B, Cin, H * W))
        y = y.view(B, Cout, H, W)
    elif x.is_contiguous(memory_format=torch.channels_last):
        rows = x.permute(0, 2, 3, 1).reshape(B, H * W, Cin)  # a view: pixels x channels
        y = torch.baddbmm(bias.view(1, 1, Cout), rows, per_image.transpose(1, 2))
        y = y.view(B, H, W, Cout).permute(0, 3, 1, 2)  # channels_last [B, Cout, H, W]
    else:
        return pointwise_conv(scale_input(x, input_scale), weight, bias, relu)
    return torch.relu(y) if relu else y
