"""The DFC attention gate of GhostNetV3 (GhostNetV2's "decoupled fully connected" attention) at
the pooled resolution, as one PyTorch custom op.

``gate = sigmoid(dw5x1(dw1x5(conv1x1(avg_pool2d(x, 2, 2)))))``, each conv with a bias, the 1x5
padded (0, 2) and the 5x1 padded (2, 0) with zeros on its own input (spec ghostnetv3.md §5). This
is the folded ``short_conv`` of a DFC Ghost module before the nearest upsampling, which
``ghostkernels.ghost_conv`` fuses into its ``gate`` epilogue. The fused backends replace the five
launches: Triton with two (pool + 1x1 to an fp32 scratch map, then the separable 5-tap stencil +
sigmoid), CUDA with one (each block recomputes the 1x1 on the 2-pixel border its stencil needs;
nothing but the gate is written). There is no C++ CPU kernel: on CPU tensors the automatic choice
is the reference.

``ghostkernels::dfc_gate`` has a fake kernel and an autograd formula that recomputes the
intermediates with torch ops (``reference.dfc_gate.backward``), so no backend needs a backward
kernel.

Kernel contract, the same for every backend module's
``forward(x, w_proj, b_proj, w_h, b_h, w_v, b_v) -> gate``:
  x [B, Cin, H, W] with H, W >= 2, contiguous in NCHW or in channels_last (``x.is_contiguous()``
  or ``x.is_contiguous(memory_format=torch.channels_last)``); w_proj [C, Cin] contiguous; w_h
  [C, 5] contiguous (the 1x5 taps, left to right); w_v [C, 5] contiguous (the 5x1 taps, top to
  bottom); b_proj, b_h, b_v [C]; all of x's dtype and device; B*Cin*C > 0. Returns gate
  [B, C, H//2, W//2] of x's dtype in x's memory format (channels_last iff x is channels_last and
  not also NCHW-contiguous), every element written; fp32 intermediates for float16/bfloat16, one
  rounding at the end.
The op layer builds zero biases for None, flattens the weights, makes x contiguous in its own
suggested memory format and detaches every tensor (backends never see requires_grad=True) before
calling a backend.
"""
from __future__ import annotations

import torch

from ghostkernels import backends
from ghostkernels.ops.eager import EagerOp
from ghostkernels.checks import (FLOATING, require_dim_size, require_dtype, require_ndim,
                                 require_same_device, require_same_dtype, require_tensor)
from ghostkernels.ops.ghost_conv import check_bias, in_memory_format
from ghostkernels.reference import dfc_gate as reference
from ghostkernels.reference.ghost_conv import output_memory_format

OP = "dfc_gate"
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
backends.register(OP, "reference", "ghostkernels.reference.dfc_gate", FLOATING)
backends.register(OP, "triton", "ghostkernels.triton.dfc_gate", GPU_DTYPES)
backends.register(OP, "cuda", "ghostkernels.compiled.dfc_gate", GPU_DTYPES)


def _empty_output(x: torch.Tensor, channels: int) -> torch.Tensor:
    B, _, H, W = x.shape
    shape = (B, channels, reference.pooled_size(H), reference.pooled_size(W))
    return torch.empty(shape, dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))


def _dfc_gate_impl(x: torch.Tensor, w_proj: torch.Tensor, b_proj: torch.Tensor, w_h: torch.Tensor,
                   b_h: torch.Tensor, w_v: torch.Tensor, b_v: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:  # nothing to compute, but a forced backend must be able to run it
        backends.check_forced(OP, x.device, x.dtype)
        return _empty_output(x, w_proj.shape[0])
    fmt = output_memory_format(x)
    x = x.detach().contiguous(memory_format=fmt)
    args = (x, *(t.detach().contiguous() for t in (w_proj, b_proj, w_h, b_h, w_v, b_v)))
    gate = backends.resolve(OP, x.device, x.dtype, args).forward(*args)
    return in_memory_format(gate.to(x.dtype), fmt)


_dfc_gate = torch.library.custom_op("ghostkernels::dfc_gate", mutates_args=())(
    _dfc_gate_impl)


@_dfc_gate.register_fake
def _(x, w_proj, b_proj, w_h, b_h, w_v, b_v):
    return _empty_output(x, w_proj.shape[0])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_gate):
    # The gradients come from torch ops (reference.backward): no backend is involved, so the
    # backward does not depend on which backend ran the forward.
    return reference.backward(grad_gate, *ctx.saved_tensors, needs=ctx.needs_input_grad)


_dfc_gate.register_autograd(_backward, setup_context=_setup_context)
_dfc_gate_call = EagerOp(_dfc_gate, _dfc_gate_impl, _setup_context, _backward)


def _check_depthwise(name: str, weight, C: int, shape: tuple[int, int], x: torch.Tensor) -> None:
    require_tensor(name, weight)
    expected = (C, 1, *shape)
    if tuple(weight.shape) != expected:
        raise ValueError(f"{name} must have shape [C, 1, {shape[0]}, {shape[1]}] = "
                         f"{list(expected)} (C from w_proj), got {tuple(weight.shape)}")
    require_same_dtype(name, weight, "x", x)
    require_same_device(name, weight, "x", x)


def dfc_gate(x: torch.Tensor, w_proj: torch.Tensor, b_proj: torch.Tensor | None,
             w_h: torch.Tensor, b_h: torch.Tensor | None, w_v: torch.Tensor,
             b_v: torch.Tensor | None) -> torch.Tensor:
    """The DFC attention gate at the pooled resolution:
    ``sigmoid(dw5x1(dw1x5(conv1x1(avg_pool2d(x, 2, 2)))))``, biases after each conv.

    Args:
        x: ``[B, Cin, H, W]`` with H, W >= 2, float64/float32/float16/bfloat16, NCHW or
            channels_last.
        w_proj: ``[C, Cin, 1, 1]`` or ``[C, Cin]``, the 1x1 projection.
        b_proj: ``[C]`` or None (zeros).
        w_h: ``[C, 1, 1, 5]``, the horizontal depthwise conv (padding (0, 2)).
        b_h: ``[C]`` or None (zeros).
        w_v: ``[C, 1, 5, 1]``, the vertical depthwise conv (padding (2, 0)).
        b_v: ``[C]`` or None (zeros).

    Returns:
        ``[B, C, H//2, W//2]`` of x's dtype, in x's memory format, values in (0, 1): upsample it
        with ``ghost_conv(..., gate=...)`` or ``F.interpolate(mode="nearest")``.
    """
    require_tensor("x", x)
    require_tensor("w_proj", w_proj)
    require_ndim("x", x, 4, "[B, Cin, H, W]")
    require_dtype("x", x, FLOATING)
    B, Cin, H, W = x.shape
    if Cin < 1:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    if H < 2 or W < 2:
        raise ValueError(f"x must be at least 2x2 (the 2x2 average pool needs one window), got "
                         f"shape {tuple(x.shape)}")
    if w_proj.dim() == 4:
        if tuple(w_proj.shape[2:]) != (1, 1):
            raise ValueError("w_proj must be a 1x1 kernel [C, Cin, 1, 1] or [C, Cin], got shape "
                             f"{tuple(w_proj.shape)}")
        w_proj = w_proj.flatten(1)
    elif w_proj.dim() != 2:
        raise ValueError(f"w_proj must be [C, Cin, 1, 1] or [C, Cin], got shape "
                         f"{tuple(w_proj.shape)}")
    C = w_proj.shape[0]
    if C < 1:
        raise ValueError(f"w_proj must have at least one output channel, got shape "
                         f"{tuple(w_proj.shape)}")
    require_dim_size("w_proj", w_proj, 1, Cin, "input channels Cin of x")
    require_same_dtype("w_proj", w_proj, "x", x)
    require_same_device("w_proj", w_proj, "x", x)
    _check_depthwise("w_h", w_h, C, (1, reference.TAPS), x)
    _check_depthwise("w_v", w_v, C, (reference.TAPS, 1), x)
    b_proj = check_bias("b_proj", b_proj, C, x, "w_proj")
    b_h = check_bias("b_h", b_h, C, x, "w_h")
    b_v = check_bias("b_v", b_v, C, x, "w_v")
    w_h, w_v = w_h.reshape(C, reference.TAPS), w_v.reshape(C, reference.TAPS)
    if backends.wants_plain_ops(OP, x):  # exporters, or a compiler that can fuse them
        return reference.forward(x, w_proj, b_proj, w_h, b_h, w_v, b_v)
    return _dfc_gate_call(x, w_proj, b_proj, w_h, b_h, w_v, b_v)
