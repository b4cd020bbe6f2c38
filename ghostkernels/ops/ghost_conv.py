"""The folded Ghost module (GhostNetV3 after re-parameterisation) as one PyTorch custom op.

``y = cat(x1, x2)[:, :out_channels]`` with ``x1 = act_p(conv1x1(x * s) + b1)`` and
``x2 = act_c(dwconv3x3(x1, padding 1) + b2)``, then ``y = y * nearest_upsample(gate) + residual``.
The three extras are optional and fuse what surrounds a Ghost module in a GhostNetV3 bottleneck:
``s = input_scale`` [B, Cin] (the SE excitation of the previous layer, applied as x is read),
``gate`` [B, out_channels, Hg, Wg] (the DFC attention at reduced resolution, already sigmoided;
``gate[..., (h * Hg) // H, (w * Wg) // W]`` multiplies y, as ``F.interpolate(mode="nearest")``)
and ``residual`` [B, out_channels, H, W] (the bottleneck shortcut, added last). The fused backends
never write x1 separately, never concatenate and never materialise x * s or the upsampled gate.

``ghostkernels::ghost_conv`` has a fake kernel (torch.compile / export trace through it) and an
autograd formula (``reference.backward`` and friends), so no backend needs a backward kernel.
Without gate and residual the gradients come from the saved output (x1 is ``y[:, :C1]``, the ReLU
masks are ``y > 0``); with either, the core output is recomputed in the backward (one extra
forward without epilogues) instead of being stored by the forward.

Kernel contract, the same for every backend module's
``forward(x, w_primary, b_primary, w_cheap, b_cheap, relu_primary: bool, relu_cheap: bool,
out_channels: int, input_scale, gate, residual) -> y``:
  x [B, Cin, H, W], contiguous in NCHW or in channels_last (``x.is_contiguous()`` or
  ``x.is_contiguous(memory_format=torch.channels_last)``); w_primary [C1, Cin] contiguous;
  b_primary [C1]; w_cheap [C1, 9] contiguous (the 3x3 taps row-major); b_cheap [C1];
  input_scale None or [B, Cin] contiguous; gate None or [B, out_channels, Hg, Wg] (Hg, Wg >= 1)
  and residual None or [B, out_channels, H, W], both contiguous in y's memory format; all of x's
  dtype and device, B*H*W > 0, C1 <= out_channels <= 2*C1. Returns y [B, out_channels, H, W] of
  x's dtype in x's memory format (channels_last iff x is channels_last and not also
  NCHW-contiguous), every element written; fp32 accumulation for float16/bfloat16, one rounding.
The op layer builds zero biases for None, flattens the weights, makes x, gate and residual
contiguous in the output's memory format and detaches every tensor (backends never see
requires_grad=True, so kernels may use out= ATen ops) before calling a backend.
"""
from __future__ import annotations

import torch

from ghostkernels import backends
from ghostkernels.ops.eager import EagerOp, zero_grads
from ghostkernels.checks import (FLOATING, require_dim_size, require_dtype, require_ndim,
                                 require_same_device, require_same_dtype, require_tensor)
from ghostkernels.reference import ghost_conv as reference
from ghostkernels.reference.conv import scale_input

OP = "ghost_conv"
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
backends.register(OP, "reference", "ghostkernels.reference.ghost_conv", FLOATING)
backends.register(OP, "cpu", "ghostkernels.compiled.ghost_conv", FLOATING)
backends.register(OP, "cuda", "ghostkernels.compiled.ghost_conv", GPU_DTYPES)
backends.register(OP, "triton", "ghostkernels.triton.ghost_conv", GPU_DTYPES)
# Measured (BENCHMARKS.md, H200, 2026-11-28): cuDNN eager (conv1x1, dwconv3x3, cat: the reference
# backend) was fastest at 15 of the 20 standard Ghost cases (fp16, batch 1/32, NCHW/channels_last);
# neither fused kernel is faster yet, so the automatic choice on CUDA is the reference.
backends.set_auto_order(OP, "cuda", ("reference", "cuda", "triton"))


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


def _ghost_conv_impl(x: torch.Tensor, w_primary: torch.Tensor, b_primary: torch.Tensor,
                     w_cheap: torch.Tensor, b_cheap: torch.Tensor, relu_primary: bool,
                     relu_cheap: bool, out_channels: int, input_scale: torch.Tensor | None = None,
                     gate: torch.Tensor | None = None,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
    B, _, H, W = x.shape
    if B * H * W == 0:  # nothing to compute, but a forced backend must be able to run it
        backends.check_forced(OP, x.device, x.dtype)
        return _empty_output(x, out_channels)
    fmt = reference.output_memory_format(x)
    x = x.detach().contiguous(memory_format=fmt)
    w_primary, b_primary, w_cheap, b_cheap = (t.detach().contiguous() for t in (
        w_primary, b_primary, w_cheap, b_cheap))
    if input_scale is not None:
        input_scale = input_scale.detach().contiguous()
    gate, residual = (None if t is None else t.detach().contiguous(memory_format=fmt)
                      for t in (gate, residual))
    args = (x, w_primary, b_primary, w_cheap, b_cheap, bool(relu_primary), bool(relu_cheap),
            int(out_channels), input_scale, gate, residual)
    y = backends.resolve(OP, x.device, x.dtype, args).forward(*args)
    return in_memory_format(y.to(x.dtype), fmt)


_ghost_conv = torch.library.custom_op("ghostkernels::ghost_conv", mutates_args=())(
    _ghost_conv_impl)


@_ghost_conv.register_fake
def _(x, w_primary, b_primary, w_cheap, b_cheap, relu_primary, relu_cheap, out_channels,
      input_scale=None, gate=None, residual=None):
    return _empty_output(x, out_channels)


def _setup_context(ctx, inputs, output):
    (x, w_primary, b_primary, w_cheap, b_cheap, relu_primary, relu_cheap, out_channels,
     input_scale, gate, residual) = inputs
    ctx.relu = (relu_primary, relu_cheap)
    # The backward recomputes the core output on this backend; autograd runs the backward of
    # CUDA tensors on its own thread, where the forward thread's use_backend and prefer_backend
    # are not in force.
    ctx.choice = backends.current_choice()
    ctx.out_channels = out_channels
    # With an epilogue, y is not the core output: the backward recomputes that (from the biases
    # too) rather than the forward storing it.
    recompute = gate is not None or residual is not None
    ctx.save_for_backward(x, w_primary, w_cheap, input_scale, gate,
                          *((b_primary, b_cheap) if recompute else (output,)))


def _backward(ctx, grad_y):
    with backends.choosing(*ctx.choice):  # see _setup_context
        return _backward_on_backend(ctx, grad_y)


def _backward_on_backend(ctx, grad_y):
    x, w_primary, w_cheap, input_scale, gate, *rest = ctx.saved_tensors
    # The dispatcher drops trailing arguments equal to their defaults (None): pad to all 11.
    needs = tuple(ctx.needs_input_grad) + (False,) * (11 - len(ctx.needs_input_grad))
    if grad_y.numel() == 0:  # B, H or W is 0
        bias = w_primary.new_empty(w_primary.shape[0])
        return zero_grads((x, w_primary, bias, w_cheap, bias, None, None, None, input_scale,
                           gate, grad_y), needs)
    if len(rest) == 1:
        y0 = rest[0]
    else:  # the core output: the same op without gate and residual
        y0 = _ghost_conv_call(x, w_primary, rest[0], w_cheap, rest[1], *ctx.relu,
                              ctx.out_channels, input_scale, None, None)
    grad_y0, grad_gate, grad_residual = reference.epilogue_backward(
        grad_y, y0, gate, needs[9], needs[10])
    needs_scaled_x = needs[0] or needs[8]
    if input_scale is None:
        scaled_x = x
    else:
        scaled_x = scale_input(x.to(reference.compute_dtype(x.dtype)), input_scale)
    grad_scaled_x, *grad_params = reference.backward(
        grad_y0, y0, scaled_x, w_primary, w_cheap, *ctx.relu,
        needs=(needs_scaled_x, *needs[1:5]))
    grad_x, grad_scale = reference.scale_backward(grad_scaled_x, x, input_scale, needs[0],
                                                  needs[8])
    if grad_x is not None:
        grad_x = grad_x.to(x.dtype)
    return (grad_x, *grad_params, None, None, None, grad_scale, grad_gate, grad_residual)


_ghost_conv.register_autograd(_backward, setup_context=_setup_context)
_ghost_conv_call = EagerOp(_ghost_conv, _ghost_conv_impl, _setup_context, _backward)


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


def check_bias(name: str, bias, channels: int, x: torch.Tensor, like: str,
               x_name: str = "x") -> torch.Tensor:
    """The bias as a [channels] tensor of x's dtype/device (zeros for None), validated; errors
    call x ``x_name``."""
    if bias is None:
        return x.new_zeros(channels)
    require_tensor(name, bias)
    if tuple(bias.shape) != (channels,):
        raise ValueError(f"{name} must have shape [{channels}] (one per channel of {like}), "
                         f"got {tuple(bias.shape)}")
    require_same_dtype(name, bias, x_name, x)
    require_same_device(name, bias, x_name, x)
    return bias


def check_same_dtype_device(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    require_same_dtype(name, t, "x", x)
    require_same_device(name, t, "x", x)


def check_epilogues(x: torch.Tensor, out_channels: int, input_scale, gate, residual) -> None:
    """Shape, dtype and device of the optional input_scale, gate and residual."""
    B, Cin, H, W = x.shape
    if input_scale is not None:
        require_tensor("input_scale", input_scale)
        if tuple(input_scale.shape) != (B, Cin):
            raise ValueError(f"input_scale must have shape [B, Cin] = [{B}, {Cin}] (one factor "
                             f"per image and input channel of x), got {tuple(input_scale.shape)}")
        check_same_dtype_device("input_scale", input_scale, x)
    if gate is not None:
        require_tensor("gate", gate)
        if (gate.dim() != 4 or tuple(gate.shape[:2]) != (B, out_channels)
                or min(gate.shape[2:]) < 1):
            raise ValueError(f"gate must have shape [B, out_channels, Hg, Wg] = [{B}, "
                             f"{out_channels}, Hg >= 1, Wg >= 1], got {tuple(gate.shape)}")
        check_same_dtype_device("gate", gate, x)
    if residual is not None:
        require_tensor("residual", residual)
        if tuple(residual.shape) != (B, out_channels, H, W):
            raise ValueError(f"residual must have the output's shape [B, out_channels, H, W] = "
                             f"[{B}, {out_channels}, {H}, {W}], got {tuple(residual.shape)}")
        check_same_dtype_device("residual", residual, x)


def ghost_conv_arguments(x, w_primary, b_primary, w_cheap, b_cheap, act_primary, act_cheap,
                         out_channels, input_scale, gate, residual):
    """The public Ghost op's arguments validated (clear errors naming the argument) and in the
    kernel contract's form: ``(x, w_primary [C1, Cin], b_primary [C1], w_cheap [C1, 9],
    b_cheap [C1], relu_primary, relu_cheap, out_channels)``, biases zeros for None."""
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
    check_epilogues(x, out_channels, input_scale, gate, residual)
    return (x, w_primary.reshape(C1, Cin), b_primary, w_cheap.reshape(C1, 9), b_cheap,
            relu_primary, relu_cheap, out_channels)


def ghost_conv(x: torch.Tensor, w_primary: torch.Tensor, b_primary: torch.Tensor | None,
               w_cheap: torch.Tensor, b_cheap: torch.Tensor | None, act_primary: str | None = "relu",
               act_cheap: str | None = "relu", out_channels: int | None = None, *,
               input_scale: torch.Tensor | None = None, gate: torch.Tensor | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """The folded Ghost module: ``cat(x1, x2)[:, :out_channels]`` in one pass, with optional
    fused input scaling, gating and residual add.

    Args:
        x: ``[B, Cin, H, W]``, float64/float32/float16/bfloat16, NCHW or channels_last.
        w_primary: ``[C1, Cin, 1, 1]`` or ``[C1, Cin]``, the folded 1x1 conv.
        b_primary: ``[C1]`` or None (zeros).
        w_cheap: ``[C1, 1, 3, 3]``, the folded depthwise 3x3 conv (padding 1).
        b_cheap: ``[C1]`` or None (zeros).
        act_primary, act_cheap: ``"relu"`` or ``"none"`` (None means ``"none"``).
        out_channels: ``C1 <= out_channels <= 2*C1`` (default ``2*C1``); like timm's GhostModule
            the result is ``cat(x1, x2)[:, :out_channels]``.
        input_scale: ``[B, Cin]`` or None: x is read as ``x * input_scale[:, :, None, None]``
            (a squeeze-excitation of the previous layer).
        gate: ``[B, out_channels, Hg, Wg]`` or None: the output (both halves, after the
            activations and the slice) is multiplied by the gate upsampled to ``H x W`` by nearest
            neighbour, ``gate[:, :, (h * Hg) // H, (w * Wg) // W]`` (GhostNetV3's DFC attention).
        residual: ``[B, out_channels, H, W]`` or None: added to the output last (after the gate).

    Returns:
        ``[B, out_channels, H, W]`` of x's dtype, in x's memory format.
    """
    (x, w_primary, b_primary, w_cheap, b_cheap, relu_primary, relu_cheap,
     out_channels) = ghost_conv_arguments(x, w_primary, b_primary, w_cheap, b_cheap, act_primary,
                                          act_cheap, out_channels, input_scale, gate, residual)
    if backends.wants_plain_ops(OP, x):  # exporters, or a compiler that can fuse them
        return reference.forward(x, w_primary, b_primary, w_cheap, b_cheap, relu_primary,
                                 relu_cheap, out_channels, input_scale, gate, residual)
    return _ghost_conv_call(x, w_primary, b_primary, w_cheap, b_cheap, relu_primary, relu_cheap,
                            out_channels, input_scale, gate, residual)
