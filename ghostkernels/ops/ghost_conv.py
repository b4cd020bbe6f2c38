"""The folded Ghost module (GhostNetV3 after re-parameterisation) as one PyTorch custom op.

``y = cat(x1, x2)[:, :out_channels]`` with ``x1 = act_p(conv1x1(x) + b1)`` and
``x2 = act_c(dwconv3x3(x1, padding 1) + b2)``; the fused backends never write x1 separately and
never concatenate. ``ghostkernels::ghost_conv`` has a fake kernel (torch.compile / export trace
through it) and an autograd formula built from the saved output (``reference.ghost_conv.backward``:
x1 is ``y[:, :C1]``, the ReLU masks are ``y > 0``), so no backend needs a backward kernel.

Kernel contract, the same for every backend module's
``forward(x, w_primary, b_primary, w_cheap, b_cheap, relu_primary: bool, relu_cheap: bool,
out_channels: int) -> y``:
  x [B, Cin, H, W], contiguous in NCHW or in channels_last (``x.is_contiguous()`` or
  ``x.is_contiguous(memory_format=torch.channels_last)``); w_primary [C1, Cin] contiguous;
  b_primary [C1]; w_cheap [C1, 9] contiguous (the 3x3 taps row-major); b_cheap [C1]; all of x's
  dtype and device, B*H*W > 0, C1 <= out_channels <= 2*C1. Returns y [B, out_channels, H, W] of
  x's dtype in x's memory format (channels_last iff x is channels_last and not also NCHW-contiguous),
  every element written; fp32 accumulation for float16/bfloat16.
The op layer builds zero biases for None, flattens the weights, makes x contiguous in its own
suggested memory format and detaches every tensor (backends never see requires_grad=True, so
kernels may use out= ATen ops) before calling a backend.
"""
from __future__ import annotations

import torch

from ghostkernels import backends
from ghostkernels.checks import (FLOATING, require_dim_size, require_dtype, require_ndim,
                                 require_same_device, require_same_dtype, require_tensor)
from ghostkernels.reference import ghost_conv as reference

OP = "ghost_conv"
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
backends.register(OP, "reference", "ghostkernels.reference.ghost_conv", FLOATING)
backends.register(OP, "cpu", "ghostkernels.compiled.ghost_conv", FLOATING)
backends.register(OP, "cuda", "ghostkernels.compiled.ghost_conv", GPU_DTYPES)
backends.register(OP, "triton", "ghostkernels.triton.ghost_conv", GPU_DTYPES)


def _empty_output(x: torch.Tensor, channels: int) -> torch.Tensor:
    B, _, H, W = x.shape
    return torch.empty((B, channels, H, W), dtype=x.dtype, device=x.device,
                       memory_format=reference.output_memory_format(x))


def in_memory_format(y: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """y with exactly the strides that ``torch.empty(y.shape, memory_format=fmt)`` has (the fake
    kernel's), copying only in the rare case a backend chose other strides (e.g. for size-1 dims)."""
    B, C, H, W = y.shape
    strides = (C * H * W, 1, W * C, C) if fmt == torch.channels_last else (C * H * W, H * W, W, 1)
    if y.stride() == strides:
        return y
    return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=fmt).copy_(y)


@torch.library.custom_op("ghostkernels::ghost_conv", mutates_args=())
def _ghost_conv(x: torch.Tensor, w_primary: torch.Tensor, b_primary: torch.Tensor,
                w_cheap: torch.Tensor, b_cheap: torch.Tensor, relu_primary: bool,
                relu_cheap: bool, out_channels: int) -> torch.Tensor:
    B, _, H, W = x.shape
    if B * H * W == 0:
        return _empty_output(x, out_channels)
    fmt = reference.output_memory_format(x)
    x = x.detach().contiguous(memory_format=fmt)
    impl = backends.resolve(OP, x.device, x.dtype)
    w_primary, b_primary, w_cheap, b_cheap = (t.detach().contiguous() for t in (
        w_primary, b_primary, w_cheap, b_cheap))
    y = impl.forward(x, w_primary, b_primary, w_cheap, b_cheap, bool(relu_primary),
                     bool(relu_cheap), int(out_channels))
    return in_memory_format(y.to(x.dtype), fmt)


@_ghost_conv.register_fake
def _(x, w_primary, b_primary, w_cheap, b_cheap, relu_primary, relu_cheap, out_channels):
    return _empty_output(x, out_channels)


def _setup_context(ctx, inputs, output):
    x, w_primary, _, w_cheap, _, relu_primary, relu_cheap, _ = inputs
    ctx.save_for_backward(x, w_primary, w_cheap, output)
    ctx.relu = (relu_primary, relu_cheap)


def _backward(ctx, grad_y):
    x, w_primary, w_cheap, y = ctx.saved_tensors
    grads = reference.backward(grad_y, y, x, w_primary, w_cheap, *ctx.relu,
                               needs=ctx.needs_input_grad[:5])
    return (*grads, None, None, None)


_ghost_conv.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public function

ACTIVATIONS = ("relu", "none")


def parse_act(name: str, act) -> bool:
    """True for "relu", False for "none"/None; anything else is an error naming ``name``."""
    if act is None or act == "none":
        return False
    if act == "relu":
        return True
    raise ValueError(f"{name} must be one of {ACTIVATIONS} or None, got {act!r}")


def check_bias(name: str, bias, channels: int, x: torch.Tensor, like: str) -> torch.Tensor:
    """The bias as a [channels] tensor of x's dtype/device (zeros for None), validated."""
    if bias is None:
        return x.new_zeros(channels)
    require_tensor(name, bias)
    if tuple(bias.shape) != (channels,):
        raise ValueError(f"{name} must have shape [{channels}] (one per channel of {like}), "
                         f"got {tuple(bias.shape)}")
    require_same_dtype(name, bias, "x", x)
    require_same_device(name, bias, "x", x)
    return bias


def ghost_conv(x: torch.Tensor, w_primary: torch.Tensor, b_primary: torch.Tensor | None,
               w_cheap: torch.Tensor, b_cheap: torch.Tensor | None, act_primary: str | None = "relu",
               act_cheap: str | None = "relu", out_channels: int | None = None) -> torch.Tensor:
    """The folded Ghost module: ``cat(x1, x2)[:, :out_channels]`` in one pass.

    Args:
        x: ``[B, Cin, H, W]``, float64/float32/float16/bfloat16, NCHW or channels_last.
        w_primary: ``[C1, Cin, 1, 1]`` or ``[C1, Cin]``, the folded 1x1 conv.
        b_primary: ``[C1]`` or None (zeros).
        w_cheap: ``[C1, 1, 3, 3]``, the folded depthwise 3x3 conv (padding 1).
        b_cheap: ``[C1]`` or None (zeros).
        act_primary, act_cheap: ``"relu"`` or ``"none"`` (None means ``"none"``).
        out_channels: ``C1 <= out_channels <= 2*C1`` (default ``2*C1``); like timm's GhostModule
            the result is ``cat(x1, x2)[:, :out_channels]``.

    Returns:
        ``[B, out_channels, H, W]`` of x's dtype, in x's memory format.
    """
    require_tensor("x", x)
    require_tensor("w_primary", w_primary)
    require_tensor("w_cheap", w_cheap)
    require_ndim("x", x, 4, "[B, Cin, H, W]")
    require_dtype("x", x, FLOATING)
    Cin = x.shape[1]
    if Cin < 1:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    if w_primary.dim() == 4:
        if tuple(w_primary.shape[2:]) != (1, 1):
            raise ValueError("w_primary must be a 1x1 kernel [C1, Cin, 1, 1] or [C1, Cin], "
                             f"got shape {tuple(w_primary.shape)}")
        w_primary = w_primary.flatten(1)
    elif w_primary.dim() != 2:
        raise ValueError("w_primary must be [C1, Cin, 1, 1] or [C1, Cin], got shape "
                         f"{tuple(w_primary.shape)}")
    C1 = w_primary.shape[0]
    if C1 < 1:
        raise ValueError(f"w_primary must have at least one output channel, got shape "
                         f"{tuple(w_primary.shape)}")
    require_dim_size("w_primary", w_primary, 1, Cin, "input channels Cin of x")
    require_same_dtype("w_primary", w_primary, "x", x)
    require_same_device("w_primary", w_primary, "x", x)
    if tuple(w_cheap.shape) != (C1, 1, 3, 3):
        raise ValueError(f"w_cheap must have shape [C1, 1, 3, 3] = [{C1}, 1, 3, 3] (C1 from "
                         f"w_primary), got {tuple(w_cheap.shape)}")
    require_same_dtype("w_cheap", w_cheap, "x", x)
    require_same_device("w_cheap", w_cheap, "x", x)
    b_primary = check_bias("b_primary", b_primary, C1, x, "w_primary")
    b_cheap = check_bias("b_cheap", b_cheap, C1, x, "w_cheap")
    relu_primary = parse_act("act_primary", act_primary)
    relu_cheap = parse_act("act_cheap", act_cheap)
    if out_channels is None:
        out_channels = 2 * C1
    if isinstance(out_channels, bool) or not isinstance(out_channels, int):
        raise TypeError(f"out_channels must be an int or None, got {type(out_channels).__name__}")
    if not C1 <= out_channels <= 2 * C1:
        raise ValueError(f"out_channels must be in [C1, 2*C1] = [{C1}, {2 * C1}] (C1 from "
                         f"w_primary), got {out_channels}")
    return _ghost_conv(x, w_primary, b_primary, w_cheap.reshape(C1, 9), b_cheap, relu_primary,
                       relu_cheap, out_channels)
