"""Reference folded depthwise convolution: ``y = act(dwconv_khxkw(x, stride, padding (kh//2, kw//2))
+ bias)``, one filter per channel (kernel contract in ``ghostkernels.ops.depthwise_conv``).

Half-precision inputs are computed in float32 and rounded once at the end (on CUDA tensors: in their
own dtype, ``reference.ghost_conv.forward_dtype``).
"""
import torch
import torch.nn.functional as F

from ghostkernels.reference import ghost_conv as ghost
from ghostkernels.reference.ghost_conv import compute_dtype, output_memory_format


def output_size(size: int, k: int, stride: int) -> int:
    return (size + 2 * (k // 2) - k) // stride + 1


def forward(x, weight, bias, kh: int, kw: int, stride: int, relu: bool):
    """x [B,C,H,W]; weight [C, kh*kw] (row-major taps); bias [C]."""
    C = x.shape[1]
    acc = ghost.forward_dtype(x)
    y = F.conv2d(x.to(acc), weight.to(acc).view(C, 1, kh, kw), bias.to(acc), stride=stride,
                 padding=(kh // 2, kw // 2), groups=C)
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype).contiguous(memory_format=output_memory_format(x))


def backward(grad_y, y, x, weight, kh: int, kw: int, stride: int, relu: bool,
             needs=(True, True, True)):
    """Gradients (x, weight [C, kh*kw], bias) from the forward output ``y`` (the ReLU mask is
    ``y > 0``); float32 inside for half types, each gradient in its input's dtype."""
    C = x.shape[1]
    acc = compute_dtype(x.dtype)
    g = grad_y.to(acc)
    if relu:
        g = g * (y > 0)
    g_x, g_w, g_b = torch.ops.aten.convolution_backward(
        g, x.to(acc), weight.to(acc).view(C, 1, kh, kw), [C], [stride, stride],
        [kh // 2, kw // 2], [1, 1], False, [0, 0], C, list(needs))
    return (g_x.to(x.dtype) if needs[0] else None,
            g_w.reshape(C, kh * kw).to(weight.dtype) if needs[1] else None,
            g_b.to(weight.dtype) if needs[2] else None)
