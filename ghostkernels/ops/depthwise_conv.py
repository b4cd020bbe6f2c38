"""Folded depthwise convolution (+ bias, optional ReLU) as one PyTorch custom op.

Serves the re-parameterised bottleneck depthwise convs (3x3/5x5, stride 1 or 2) and the DFC gate's
1x5 / 5x1 convs: ``y = act(dwconv(x, weight, stride, padding (kh//2, kw//2)) + bias)``.
``ghostkernels::depthwise_conv`` has a fake kernel and an autograd formula built from the saved
output (``reference.depthwise_conv.backward``), so no backend needs a backward kernel; a backend
module with a ``backward`` of the same signature (the C++ CPU kernel) runs it in eager mode.

Kernel contract, the same for every backend module's
``forward(x, weight, bias, kh: int, kw: int, stride: int, relu: bool) -> y``:
  x [B, C, H, W], contiguous in NCHW or in channels_last (``x.is_contiguous()`` or
  ``x.is_contiguous(memory_format=torch.channels_last)``); weight [C, kh*kw] contiguous (taps
  row-major); bias [C]; all of x's dtype and device; kh, kw in {1, 3, 5}; stride in {1, 2};
  B*C*H*W > 0. Returns y [B, C, Ho, Wo] with Ho = (H - 1) // stride + 1 (likewise Wo; padding is
  (kh//2, kw//2), zeros) of x's dtype in x's memory format (channels_last iff x is channels_last
  and not also NCHW-contiguous), every element written; fp32 accumulation for float16/bfloat16.
The op layer builds a zero bias for None, flattens the weight, makes x contiguous in its own
suggested memory format and detaches every tensor (backends never see requires_grad=True) before
calling a backend.
"""
from __future__ import annotations

import torch

from ghostkernels import backends
from ghostkernels.ops.eager import EagerOp, eager_safe, zero_grads
from ghostkernels.checks import FLOATING, require_dtype, require_ndim, require_same_device
from ghostkernels.checks import require_same_dtype, require_tensor
from ghostkernels.ops.ghost_conv import check_bias, in_memory_format, parse_act
from ghostkernels.reference import depthwise_conv as reference
from ghostkernels.reference.ghost_conv import output_memory_format

OP = "depthwise_conv"
KERNEL_SIZES = (1, 3, 5)
STRIDES = (1, 2)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
backends.register(OP, "reference", "ghostkernels.reference.depthwise_conv", FLOATING)
backends.register(OP, "cpu", "ghostkernels.compiled.depthwise_conv", FLOATING)
backends.register(OP, "cuda", "ghostkernels.compiled.depthwise_conv", GPU_DTYPES)
backends.register(OP, "triton", "ghostkernels.triton.depthwise_conv", GPU_DTYPES)
# Measured (BENCHMARKS.md, H200, 2026-11-28): cuDNN's depthwise conv (the reference backend) was
# fastest at 18 of 20 standard cases and at all 10 channels_last ones: automatic choice on CUDA.
backends.set_auto_order(OP, "cuda", ("reference", "cuda", "triton"))


def _empty_output(x: torch.Tensor, kh: int, kw: int, stride: int) -> torch.Tensor:
    B, C, H, W = x.shape
    shape = (B, C, reference.output_size(H, kh, stride), reference.output_size(W, kw, stride))
    return torch.empty(shape, dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))


def _depthwise_conv_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kh: int,
                         kw: int, stride: int, relu: bool) -> torch.Tensor:
    if x.numel() == 0:  # nothing to compute, but a forced backend must be able to run it
        backends.check_forced(OP, x.device, x.dtype)
        return _empty_output(x, kh, kw, stride)
    fmt = output_memory_format(x)
    x = x.detach().contiguous(memory_format=fmt)
    args = (x, weight.detach().contiguous(), bias.detach().contiguous(), int(kh), int(kw),
            int(stride), bool(relu))
    y = backends.resolve(OP, x.device, x.dtype, args).forward(*args)
    return in_memory_format(y.to(x.dtype), fmt)


_depthwise_conv = torch.library.custom_op("ghostkernels::depthwise_conv", mutates_args=())(
    _depthwise_conv_impl)


@_depthwise_conv.register_fake
def _(x, weight, bias, kh, kw, stride, relu):
    return _empty_output(x, kh, kw, stride)


def _setup_context(ctx, inputs, output):
    x, weight, _, kh, kw, stride, relu = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.geometry = (kh, kw, stride, relu)
    # The forward thread's choice: autograd runs the backward of CUDA tensors on its own thread,
    # where the forward thread's use_backend and prefer_backend are not in force.
    ctx.choice = backends.current_choice()


def _backward(ctx, grad_y):
    x, weight, y = ctx.saved_tensors
    # The chosen backend's backward kernel where it has one (the C++ CPU kernel), in plain eager
    # execution only: under tracers (torch.compile, fake tensors) the reference formula's aten
    # ops are what gets traced. Chosen before the early return (see backends.check_forced).
    backward = reference.backward
    # Not under create_graph=True (grad mode on here): the kernel has no derivative of its own,
    # the reference formula (aten ops) differentiates twice.
    if eager_safe((grad_y, x, weight, y)) and not torch.is_grad_enabled():
        with backends.choosing(*ctx.choice):
            impl = backends.resolve(OP, x.device, x.dtype)
        backward = getattr(impl, "backward", backward)
    if grad_y.numel() == 0:  # B, H or W is 0
        return (*zero_grads((x, weight, weight[:, 0]), ctx.needs_input_grad), None, None, None,
                None)
    grads = backward(grad_y, y, x, weight, *ctx.geometry, needs=ctx.needs_input_grad[:3])
    return (*grads, None, None, None, None)


_depthwise_conv.register_autograd(_backward, setup_context=_setup_context)
_depthwise_conv_call = EagerOp(_depthwise_conv, _depthwise_conv_impl, _setup_context, _backward)


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   stride: int = 1, act: str | None = "none") -> torch.Tensor:
    """Depthwise convolution with bias and optional ReLU, padding ``(kh//2, kw//2)``.

    Args:
        x: ``[B, C, H, W]``, float64/float32/float16/bfloat16, NCHW or channels_last.
        weight: ``[C, 1, kh, kw]`` with kh, kw each in {1, 3, 5}.
        bias: ``[C]`` or None (zeros).
        stride: 1 or 2 (both spatial dims).
        act: ``"relu"`` or ``"none"`` (None means ``"none"``).

    Returns:
        ``[B, C, (H-1)//stride+1, (W-1)//stride+1]`` of x's dtype, in x's memory format.
    """
    require_tensor("x", x)
    require_tensor("weight", weight)
    require_ndim("x", x, 4, "[B, C, H, W]")
    require_dtype("x", x, FLOATING)
    C = x.shape[1]
    require_ndim("weight", weight, 4, "[C, 1, kh, kw]")
    kh, kw = weight.shape[2], weight.shape[3]
    if weight.shape[0] != C or weight.shape[1] != 1 or kh not in KERNEL_SIZES \
            or kw not in KERNEL_SIZES:
        raise ValueError(f"weight must have shape [C, 1, kh, kw] with C = {C} (channels of x) and "
                         f"kh, kw in {KERNEL_SIZES}, got {tuple(weight.shape)}")
    require_same_dtype("weight", weight, "x", x)
    require_same_device("weight", weight, "x", x)
    bias = check_bias("bias", bias, C, x, "x")
    if isinstance(stride, bool) or stride not in STRIDES:
        raise ValueError(f"stride must be one of {STRIDES}, got {stride!r}")
    relu = parse_act("act", act)
    if backends.wants_plain_ops(OP, x):  # exporters, or a compiler that can fuse them
        return reference.forward(x, weight.reshape(C, kh * kw), bias, kh, kw, int(stride), relu)
    return _depthwise_conv_call(x, weight.reshape(C, kh * kw), bias, kh, kw, int(stride), relu)
