"""The excitation of GhostNetV3's squeeze-and-excitation block after the global average, as one
PyTorch custom op.

``scale = hardsigmoid(w_expand @ relu(w_reduce @ pooled + b_reduce) + b_expand)`` per image: the
SE block's 1x1 ``conv_reduce`` (bias), ReLU, 1x1 ``conv_expand`` (bias) and hard-sigmoid on the
[B, C] channel means, four operators (hence four kernel launches on a GPU) in one. The mean over
H, W stays outside (``x.mean((2, 3))``, one full-GPU reduction). The Triton backend makes one
launch; there is no C++ kernel: on CPU tensors the automatic choice is the reference.

``ghostkernels::se_excitation`` has a fake kernel and an autograd formula that recomputes the
pre-activations with torch ops (``reference.se_excitation.backward``), so no backend needs a
backward kernel.

Kernel contract, the same for every backend module's
``forward(pooled, w_reduce, b_reduce, w_expand, b_expand) -> scale``:
  pooled [B, C] contiguous with B, C >= 1; w_reduce [R, C] contiguous with R >= 1; b_reduce [R];
  w_expand [C, R] contiguous; b_expand [C]; all of pooled's dtype and device. Returns scale
  [B, C] contiguous of pooled's dtype, every element written; fp32 intermediates for
  float16/bfloat16, one rounding at the end.
The op layer builds zero biases for None, flattens 1x1 conv weights, makes every tensor contiguous
and detaches it (backends never see requires_grad=True) before calling a backend.
"""
from __future__ import annotations

import torch

from ghostkernels import backends
from ghostkernels.ops.eager import EagerOp
from ghostkernels.checks import (FLOATING, require_dim_size, require_dtype, require_ndim,
                                 require_same_device, require_same_dtype, require_tensor)
from ghostkernels.ops.ghost_conv import check_bias
from ghostkernels.reference import se_excitation as reference

OP = "se_excitation"
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
backends.register(OP, "reference", "ghostkernels.reference.se_excitation", FLOATING)
backends.register(OP, "triton", "ghostkernels.triton.se_excitation", GPU_DTYPES)


def _se_excitation_impl(pooled: torch.Tensor, w_reduce: torch.Tensor, b_reduce: torch.Tensor,
                        w_expand: torch.Tensor, b_expand: torch.Tensor) -> torch.Tensor:
    if pooled.numel() == 0:  # nothing to compute, but a forced backend must be able to run it
        backends.check_forced(OP, pooled.device, pooled.dtype)
        return torch.empty_like(pooled, memory_format=torch.contiguous_format)
    args = tuple(t.detach().contiguous() for t in (pooled, w_reduce, b_reduce, w_expand, b_expand))
    return backends.resolve(OP, pooled.device, pooled.dtype, args).forward(*args).to(pooled.dtype)


_se_excitation = torch.library.custom_op("ghostkernels::se_excitation", mutates_args=())(
    _se_excitation_impl)


@_se_excitation.register_fake
def _(pooled, w_reduce, b_reduce, w_expand, b_expand):
    return torch.empty_like(pooled, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_scale):
    # Torch ops only (reference.backward): the backward does not depend on the forward's backend.
    return reference.backward(grad_scale, *ctx.saved_tensors, needs=ctx.needs_input_grad)


_se_excitation.register_autograd(_backward, setup_context=_setup_context)
_se_excitation_call = EagerOp(_se_excitation, _se_excitation_impl, _setup_context, _backward)


def _check_weight(name: str, weight, rows: str, cols: str, pooled: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv weight [rows, cols, 1, 1] or a matrix [rows, cols], as the matrix."""
    require_tensor(name, weight)
    if weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1):
        weight = weight.flatten(1)
    if weight.dim() != 2:
        raise ValueError(f"{name} must be [{rows}, {cols}, 1, 1] (a 1x1 conv weight) or "
                         f"[{rows}, {cols}], got shape {tuple(weight.shape)}")
    require_same_dtype(name, weight, "pooled", pooled)
    require_same_device(name, weight, "pooled", pooled)
    return weight


def se_excitation(pooled: torch.Tensor, w_reduce: torch.Tensor, b_reduce: torch.Tensor | None,
                  w_expand: torch.Tensor, b_expand: torch.Tensor | None) -> torch.Tensor:
    """The SE excitation ``hardsigmoid(w_expand @ relu(w_reduce @ pooled + b_reduce) +
    b_expand)`` of each image (hardsigmoid(z) = clamp(z / 6 + 1/2, 0, 1)).

    Args:
        pooled: ``[B, C]``, the channel means (``x.mean((2, 3))``), float64/float32/float16/
            bfloat16.
        w_reduce: ``[R, C, 1, 1]`` (the SE block's ``conv_reduce.weight``) or ``[R, C]``.
        b_reduce: ``[R]`` or None (zeros).
        w_expand: ``[C, R, 1, 1]`` (``conv_expand.weight``) or ``[C, R]``.
        b_expand: ``[C]`` or None (zeros).

    Returns:
        ``[B, C]`` of pooled's dtype, values in [0, 1]: the factors that scale x's channels.
    """
    require_tensor("pooled", pooled)
    require_ndim("pooled", pooled, 2, "[B, C]")
    require_dtype("pooled", pooled, FLOATING)
    C = pooled.shape[1]
    if C < 1:
        raise ValueError(f"pooled must have at least one channel, got shape {tuple(pooled.shape)}")
    w_reduce = _check_weight("w_reduce", w_reduce, "R", "C", pooled)
    R = w_reduce.shape[0]
    if R < 1:
        raise ValueError(f"w_reduce must have at least one output channel R, got shape "
                         f"{tuple(w_reduce.shape)}")
    require_dim_size("w_reduce", w_reduce, 1, C, "channels C of pooled")
    w_expand = _check_weight("w_expand", w_expand, "C", "R", pooled)
    require_dim_size("w_expand", w_expand, 0, C, "channels C of pooled")
    require_dim_size("w_expand", w_expand, 1, R, "hidden channels R of w_reduce")
    b_reduce = check_bias("b_reduce", b_reduce, R, pooled, "w_reduce", "pooled")
    b_expand = check_bias("b_expand", b_expand, C, pooled, "w_expand", "pooled")
    if backends.wants_plain_ops(OP, pooled):  # exporters, or a compiler that can fuse them
        return reference.forward(pooled, w_reduce, b_reduce, w_expand, b_expand)
    return _se_excitation_call(pooled, w_reduce, b_reduce, w_expand, b_expand)
