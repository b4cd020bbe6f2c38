"""The folded Ghost module followed by a strided depthwise conv, as one PyTorch custom op.

In a stride-2 GhostNetV3 bottleneck, ghost1's output (``ghost_conv`` with the DFC gate) has one
consumer: the bottleneck's k x k stride-2 depthwise conv. Run apart, ghost1 writes that output
(the largest tensor of the block: 48-672 channels at the block's input resolution) and the
depthwise conv reads it straight back; at batch 32, 640x640, fp16 that is 600 MB written and read
again over the four stride-2 blocks of GhostNetV3-1.0, ~22 % of the fused backbone's memory floor
(bench/PERF_NOTES.md). This op computes

``y = act_dw(dwconv_kxk(ghost_conv(x, ..., input_scale, gate), stride, padding k//2) + b_dw)``

and its fused (Triton) kernel keeps the Ghost output on chip: each program computes the Ghost
module on the region of the input its output tile needs (with the halos of both depthwise convs)
and writes only the strided result.

``ghostkernels::ghost_conv_depthwise`` has a fake kernel and an autograd formula that recomputes
the reference with PyTorch autograd (``reference.ghost_conv_depthwise.backward``), so no backend
needs a backward kernel. Backends: the reference (PyTorch: the Ghost op's reference, then the
depthwise conv's) and Triton. There is no C++ CPU or CUDA C++ kernel: where a forced backend has
none, the GhostNetV3 bottleneck runs ``ghost_conv`` and ``depthwise_conv`` instead.

Kernel contract, the same for every backend module's ``forward(x, w_primary, b_primary, w_cheap,
b_cheap, w_dw, b_dw, kernel_size: int, stride: int, relu_primary: bool, relu_cheap: bool,
relu_dw: bool, out_channels: int, input_scale, gate) -> y``:
  x, w_primary, b_primary, w_cheap, b_cheap, out_channels, input_scale and gate as in
  ``ghostkernels.ops.ghost_conv`` (the kernel contract there); w_dw [out_channels, k*k]
  contiguous (taps row-major) and b_dw [out_channels], of x's dtype and device; kernel_size k in
  {1, 3, 5}; stride in {1, 2}. Returns y [B, out_channels, Ho, Wo], Ho = (H - 1) // stride + 1
  (likewise Wo), of x's dtype in x's memory format, every element written; fp32 throughout for
  float16/bfloat16 (the Ghost output is not rounded), one rounding at the end.
"""
from __future__ import annotations

import torch

from ghostkernels import backends
from ghostkernels.checks import FLOATING, require_ndim, require_tensor
from ghostkernels.ops.depthwise_conv import STRIDES
from ghostkernels.ops.eager import EagerOp, zero_grads
from ghostkernels.ops.ghost_conv import (check_bias, check_same_dtype_device, ghost_conv_arguments,
                                         in_memory_format, parse_act)
from ghostkernels.reference import depthwise_conv as reference_depthwise
from ghostkernels.reference import ghost_conv_depthwise as reference
from ghostkernels.reference.ghost_conv import output_memory_format

OP = "ghost_conv_depthwise"
KERNEL_SIZES = (1, 3, 5)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
backends.register(OP, "reference", "ghostkernels.reference.ghost_conv_depthwise", FLOATING)
backends.register(OP, "triton", "ghostkernels.triton.ghost_conv_depthwise", GPU_DTYPES)
# Not yet timed on a GPU: the reference (cuDNN's convs) stays the automatic choice on CUDA, as for
# ghost_conv and depthwise_conv; ghostkernels.tune picks the Triton kernel per shape where faster.
backends.set_auto_order(OP, "cuda", ("reference", "triton"))


def _empty_output(x: torch.Tensor, channels: int, kernel_size: int, stride: int):
    B, _, H, W = x.shape
    shape = (B, channels, reference_depthwise.output_size(H, kernel_size, stride),
             reference_depthwise.output_size(W, kernel_size, stride))
    return torch.empty(shape, dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))


def _impl(x: torch.Tensor, w_primary: torch.Tensor, b_primary: torch.Tensor,
          w_cheap: torch.Tensor, b_cheap: torch.Tensor, w_dw: torch.Tensor, b_dw: torch.Tensor,
          kernel_size: int, stride: int, relu_primary: bool, relu_cheap: bool, relu_dw: bool,
          out_channels: int, input_scale: torch.Tensor | None = None,
          gate: torch.Tensor | None = None) -> torch.Tensor:
    B, _, H, W = x.shape
    if B * H * W == 0:  # nothing to compute, but a forced backend must be able to run it
        backends.check_forced(OP, x.device, x.dtype)
        return _empty_output(x, out_channels, kernel_size, stride)
    fmt = output_memory_format(x)
    x = x.detach().contiguous(memory_format=fmt)
    params = (t.detach().contiguous() for t in (w_primary, b_primary, w_cheap, b_cheap, w_dw,
                                                 b_dw))
    if input_scale is not None:
        input_scale = input_scale.detach().contiguous()
    if gate is not None:
        gate = gate.detach().contiguous(memory_format=fmt)
    args = (x, *params, int(kernel_size), int(stride), bool(relu_primary), bool(relu_cheap),
            bool(relu_dw), int(out_channels), input_scale, gate)
    y = backends.resolve(OP, x.device, x.dtype, args).forward(*args)
    return in_memory_format(y.to(x.dtype), fmt)


_custom_op = torch.library.custom_op("ghostkernels::ghost_conv_depthwise", mutates_args=())(_impl)


@_custom_op.register_fake
def _(x, w_primary, b_primary, w_cheap, b_cheap, w_dw, b_dw, kernel_size, stride, relu_primary,
      relu_cheap, relu_dw, out_channels, input_scale=None, gate=None):
    return _empty_output(x, out_channels, kernel_size, stride)


_GEOMETRY = ("kernel_size", "stride", "relu_primary", "relu_cheap", "relu_dw", "out_channels")
_INPUT_NAMES = ("x", "w_primary", "b_primary", "w_cheap", "b_cheap", "w_dw", "b_dw",
                *_GEOMETRY, "input_scale", "gate")


def _setup_context(ctx, inputs, output):
    # The dispatcher drops trailing arguments equal to their defaults (None): pad to all 15.
    inputs = tuple(inputs) + (None,) * (len(_INPUT_NAMES) - len(inputs))
    named = dict(zip(_INPUT_NAMES, inputs))
    ctx.geometry = {k: named[k] for k in _GEOMETRY}
    ctx.save_for_backward(*(named[k] for k in reference.TENSOR_ARGS))


def _backward(ctx, grad_y):
    tensors = dict(zip(reference.TENSOR_ARGS, ctx.saved_tensors))
    needs = tuple(ctx.needs_input_grad) + (False,) * (len(_INPUT_NAMES) - len(
        ctx.needs_input_grad))
    if grad_y.numel() == 0:  # B, H or W is 0
        return zero_grads([tensors.get(name) for name in _INPUT_NAMES], needs)
    grads = reference.backward(grad_y, tensors, ctx.geometry, dict(zip(_INPUT_NAMES, needs)))
    return tuple(grads.get(name) for name in _INPUT_NAMES)


_custom_op.register_autograd(_backward, setup_context=_setup_context)
_call = EagerOp(_custom_op, _impl, _setup_context, _backward)


def ghost_conv_depthwise(x: torch.Tensor, w_primary: torch.Tensor,
                         b_primary: torch.Tensor | None, w_cheap: torch.Tensor,
                         b_cheap: torch.Tensor | None, w_dw: torch.Tensor,
                         b_dw: torch.Tensor | None, act_primary: str | None = "relu",
                         act_cheap: str | None = "relu", out_channels: int | None = None, *,
                         stride: int = 2, act_dw: str | None = "none",
                         input_scale: torch.Tensor | None = None,
                         gate: torch.Tensor | None = None) -> torch.Tensor:
    """``depthwise_conv(ghost_conv(x, ...), w_dw, b_dw, stride, act_dw)`` in one pass: the
    Ghost module's output (with its optional input scale and gate) goes straight into a k x k
    depthwise conv (padding k//2) without being written.

    Args:
        x, w_primary, b_primary, w_cheap, b_cheap, act_primary, act_cheap, out_channels,
            input_scale, gate: as in :func:`ghostkernels.ghost_conv`.
        w_dw: ``[out_channels, 1, k, k]`` with k in {1, 3, 5}: the depthwise conv on the Ghost
            output.
        b_dw: ``[out_channels]`` or None (zeros).
        stride: 1 or 2.
        act_dw: ``"relu"`` or ``"none"`` (None means ``"none"``), after the depthwise conv.

    Returns:
        ``[B, out_channels, (H-1)//stride+1, (W-1)//stride+1]`` of x's dtype, in x's memory
        format.
    """
    (x, w_primary, b_primary, w_cheap, b_cheap, relu_primary, relu_cheap,
     out_channels) = ghost_conv_arguments(x, w_primary, b_primary, w_cheap, b_cheap, act_primary,
                                          act_cheap, out_channels, input_scale, gate, None)
    require_tensor("w_dw", w_dw)
    require_ndim("w_dw", w_dw, 4, "[out_channels, 1, k, k]")
    k = w_dw.shape[2]
    if tuple(w_dw.shape) != (out_channels, 1, k, k) or k not in KERNEL_SIZES:
        raise ValueError(f"w_dw must have shape [out_channels, 1, k, k] with out_channels = "
                         f"{out_channels} and k in {KERNEL_SIZES}, got {tuple(w_dw.shape)}")
    check_same_dtype_device("w_dw", w_dw, x)
    b_dw = check_bias("b_dw", b_dw, out_channels, x, "w_dw")
    if isinstance(stride, bool) or stride not in STRIDES:
        raise ValueError(f"stride must be one of {STRIDES}, got {stride!r}")
    relu_dw = parse_act("act_dw", act_dw)
    args = (x, w_primary, b_primary, w_cheap, b_cheap, w_dw.reshape(out_channels, k * k), b_dw,
            k, int(stride), relu_primary, relu_cheap, relu_dw, out_channels, input_scale, gate)
    if backends.wants_plain_ops(OP, x):  # exporters, or a compiler that can fuse them
        return reference.forward(*args)
    return _call(*args)
