"""Reference folded Ghost op: ``y = cat(x1, x2)[:, :out_channels]`` with
``x1 = act(conv1x1(x) + b1)`` and ``x2 = act(dwconv3x3(x1, padding 1) + b2)``.

This *defines* the op (kernel contract in ``ghostkernels.ops.ghost_conv``). Half-precision inputs
are computed in float32 and rounded once at the end, as the fused kernels do (x2 is computed from
the unrounded x1). ``backward`` gives the gradients from the saved output alone: x1 is
``y[:, :C1]`` (out_channels >= C1 always) and the ReLU masks are ``y > 0``.
"""
import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float64, torch.float32) else torch.float32


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is laid out channels-last (and not also plain contiguous), else NCHW."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.channels_last if x.stride(1) < x.stride(3) else torch.contiguous_format


def forward(x, w_primary, b_primary, w_cheap, b_cheap, relu_primary: bool, relu_cheap: bool,
            out_channels: int):
    """x [B,Cin,H,W]; w_primary [C1,Cin]; b_primary [C1]; w_cheap [C1,9]; b_cheap [C1]."""
    C1, Cin = w_primary.shape
    acc = compute_dtype(x.dtype)
    xc = x.to(acc)
    x1 = F.conv2d(xc, w_primary.to(acc).view(C1, Cin, 1, 1), b_primary.to(acc))
    if relu_primary:
        x1 = torch.relu(x1)
    C2 = out_channels - C1  # cheap channels that survive the slice
    parts = [x1]
    if C2 > 0:
        x2 = F.conv2d(x1[:, :C2], w_cheap[:C2].to(acc).view(C2, 1, 3, 3), b_cheap[:C2].to(acc),
                      padding=1, groups=C2)
        parts.append(torch.relu(x2) if relu_cheap else x2)
    y = torch.cat(parts, dim=1).to(x.dtype)
    return y.contiguous(memory_format=output_memory_format(x))


def _conv_backward(grad_out, inp, weight, padding, stride, groups, mask):
    return torch.ops.aten.convolution_backward(
        grad_out, inp, weight, [weight.shape[0]], [stride, stride], list(padding), [1, 1],
        False, [0, 0], groups, mask)


def backward(grad_y, y, x, w_primary, w_cheap, relu_primary: bool, relu_cheap: bool,
             needs=(True, True, True, True, True)):
    """Gradients (x, w_primary, b_primary, w_cheap, b_cheap) from the forward output ``y``.

    Plain differentiable PyTorch ops, computed in float32 for half types; every gradient comes
    back in its input's dtype (None where ``needs`` is False)."""
    C1, Cin = w_primary.shape
    out_channels = y.shape[1]
    C2 = out_channels - C1
    acc = compute_dtype(x.dtype)
    g = grad_y.to(acc)
    y = y.to(acc)
    x1 = y[:, :C1]
    g_x1 = g[:, :C1]
    g_w_cheap = g_b_cheap = None
    if C2 > 0:
        g2 = g[:, C1:]
        if relu_cheap:
            g2 = g2 * (y[:, C1:] > 0)
        cheap_w = w_cheap[:C2].to(acc).view(C2, 1, 3, 3)
        g_in, g_w, g_b = _conv_backward(g2, x1[:, :C2], cheap_w, (1, 1), 1, C2,
                                        [True, needs[3], needs[4]])
        g_x1 = g_x1 + F.pad(g_in, (0, 0, 0, 0, 0, C1 - C2))
        if needs[3]:
            g_w_cheap = F.pad(g_w.reshape(C2, 9), (0, 0, 0, C1 - C2)).to(w_cheap.dtype)
        if needs[4]:
            g_b_cheap = F.pad(g_b, (0, C1 - C2)).to(w_cheap.dtype)
    else:
        zeros = w_cheap.new_zeros(C1, 9)
        g_w_cheap = zeros if needs[3] else None
        g_b_cheap = zeros[:, 0].contiguous() if needs[4] else None
    if relu_primary:
        g_x1 = g_x1 * (x1 > 0)
    g_x, g_w, g_b = _conv_backward(g_x1, x.to(acc), w_primary.to(acc).view(C1, Cin, 1, 1),
                                   (0, 0), 1, 1, [needs[0], needs[1], needs[2]])
    return (g_x.to(x.dtype) if needs[0] else None,
            g_w.reshape(C1, Cin).to(w_primary.dtype) if needs[1] else None,
            g_b.to(w_primary.dtype) if needs[2] else None,
            g_w_cheap, g_b_cheap)
