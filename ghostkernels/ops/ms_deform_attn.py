"""Multi-scale deformable attention as a PyTorch custom op.

``ghostkernels::ms_deform_attn`` (forward) and ``ghostkernels::ms_deform_attn_backward`` are
``torch.library`` custom ops with fake kernels (torch.compile / torch.export trace through them)
and a registered autograd formula. Each call runs on one backend (see ``ghostkernels.backends``).

Kernel contract, the same for every backend module (``forward`` / ``backward``):
  value [N,S,M,D] (dtype T), spatial_shapes [L,2] int64, level_start_index [L] int64,
  sampling_locations [N,Lq,M,L,P,2] in the accumulation dtype (float64 for T=float64, else
  float32), attention_weights [N,Lq,M,L,P] (dtype T); all contiguous on one device.
  forward -> [N,Lq,M*D] (T). backward(grad_output [N,Lq,M*D] (T), ...) ->
  (grad_value, grad_sampling_locations, grad_attention_weights), each T or float32.
"""
from __future__ import annotations

import weakref

import torch

from ghostkernels import backends
from ghostkernels.reference.ms_deform_attn import ms_deform_attn_forward as reference_forward
from ghostkernels.checks import (FLOATING, dtype_name, require_dim_size, require_dtype,
                                 require_ndim, require_same_device, require_same_dtype,
                                 require_tensor, tracing)

OP = "ms_deform_attn"
HALF = (torch.float16, torch.bfloat16)
backends.register(OP, "reference", "ghostkernels.reference.ms_deform_attn", FLOATING)
backends.register(OP, "cpu", "ghostkernels.compiled.ms_deform_attn", FLOATING)
backends.register(OP, "cuda", "ghostkernels.compiled.ms_deform_attn",
                  (torch.float32, torch.float16, torch.bfloat16, torch.float64))
backends.register(OP, "triton", "ghostkernels.triton.ms_deform_attn",
                  (torch.float32, torch.float16, torch.bfloat16))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights):
    acc = accumulation_dtype(value.dtype)
    return (value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
            sampling_locations.to(acc).contiguous(), attention_weights.contiguous())


@torch.library.custom_op("ghostkernels::ms_deform_attn", mutates_args=())
def _ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor,
                    level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                    attention_weights: torch.Tensor) -> torch.Tensor:
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    if N * Lq * M * D == 0:
        return value.new_zeros(N, Lq, M * D)
    impl = backends.resolve(OP, value.device, value.dtype)
    out = impl.forward(*_kernel_inputs(value, spatial_shapes, level_start_index,
                                       sampling_locations, attention_weights))
    return out.to(value.dtype)


@_ms_deform_attn.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, _, M, D = value.shape
    return value.new_empty(N, sampling_locations.shape[1], M * D)


@torch.library.custom_op("ghostkernels::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward(grad_output: torch.Tensor, value: torch.Tensor,
                             spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                             sampling_locations: torch.Tensor, attention_weights: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if grad_output.numel() == 0 or value.numel() == 0:
        return (torch.zeros_like(value), torch.zeros_like(sampling_locations),
                torch.zeros_like(attention_weights))
    impl = backends.resolve(OP, value.device, value.dtype)
    g_value, g_loc, g_attn = impl.backward(
        grad_output.to(value.dtype).contiguous(),
        *_kernel_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                        attention_weights))
    return (g_value.to(value.dtype), g_loc.to(sampling_locations.dtype),
            g_attn.to(attention_weights.dtype))


@_ms_deform_attn_backward.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
      attention_weights):
    return (torch.empty_like(value), torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = \
        ctx.saved_tensors
    g_value, g_loc, g_attn = _ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations,
        attention_weights)
    needs = ctx.needs_input_grad
    return (g_value if needs[0] else None, None, None, g_loc if needs[3] else None,
            g_attn if needs[4] else None)


_ms_deform_attn.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public function

# Level metadata already checked: key -> weak references to the very tensors that were checked (a
# key alone could match a new tensor that reuses a freed one's memory with other contents).
_validated: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}


def _check_levels(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, S: int) -> None:
    """Value-dependent checks of the level metadata (host read; cached per tensor version)."""
    key = (spatial_shapes.data_ptr(), spatial_shapes._version, tuple(spatial_shapes.shape),
           level_start_index.data_ptr(), level_start_index._version, S, spatial_shapes.device)
    seen = _validated.get(key)
    if seen is not None and seen[0]() is spatial_shapes and seen[1]() is level_start_index:
        return
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    total = 0
    for lvl, (h, w) in enumerate(shapes):
        if h < 1 or w < 1:
            raise ValueError(f"spatial_shapes[{lvl}] must be a positive (h, w), got ({h}, {w})")
        if starts[lvl] != total:
            raise ValueError(
                f"level_start_index must be the running sum of h*w over spatial_shapes "
                f"(expected {[sum(a * b for a, b in shapes[:i]) for i in range(len(shapes))]}), "
                f"got {starts}")
        total += h * w
    if total != S:
        raise ValueError(f"spatial_shapes must describe value's {S} positions "
                         f"(sum of h*w over levels), but they sum to {total}: {shapes}")
    if len(_validated) > 1024:
        _validated.clear()
    _validated[key] = (weakref.ref(spatial_shapes), weakref.ref(level_start_index))


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor,
                   level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable-DETR / mmcv semantics).

    Args:
        value: ``[N, S, M, D]`` values of all levels, flattened row-major per level.
        spatial_shapes: ``[L, 2]`` int64, ``(h, w)`` of each level.
        level_start_index: ``[L]`` int64, offset of each level in ``S``.
        sampling_locations: ``[N, Lq, M, L, P, 2]``, ``(x, y)`` normalised to ``[0, 1]``;
            value's dtype or float32 (kept in float32 for half-precision values).
        attention_weights: ``[N, Lq, M, L, P]``, value's dtype (normally softmaxed over L*P).

    Returns:
        ``[N, Lq, M*D]`` in value's dtype: for every query and head, the sum over levels and
        points of weight x bilinear sample (zero padding, ``align_corners=False``).
    """
    for name, t in (("value", value), ("spatial_shapes", spatial_shapes),
                    ("level_start_index", level_start_index),
                    ("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        require_tensor(name, t)
    require_ndim("value", value, 4, "[N, S, M, D]")
    require_ndim("spatial_shapes", spatial_shapes, 2, "[L, 2]")
    require_ndim("level_start_index", level_start_index, 1, "[L]")
    require_ndim("sampling_locations", sampling_locations, 6, "[N, Lq, M, L, P, 2]")
    require_ndim("attention_weights", attention_weights, 5, "[N, Lq, M, L, P]")
    require_dtype("value", value, FLOATING)
    require_dtype("spatial_shapes", spatial_shapes, (torch.int64,))
    require_dtype("level_start_index", level_start_index, (torch.int64,))
    require_same_dtype("attention_weights", attention_weights, "value", value)
    if sampling_locations.dtype not in (value.dtype, torch.float32):
        raise TypeError(f"sampling_locations must have value's dtype ({dtype_name(value.dtype)}) "
                        f"or float32, got {dtype_name(sampling_locations.dtype)}")
    require_same_device("sampling_locations", sampling_locations, "value", value)
    require_same_device("attention_weights", attention_weights, "value", value)
    N, S, M, D = value.shape
    L = spatial_shapes.shape[0]
    require_dim_size("spatial_shapes", spatial_shapes, 1, 2, "(h, w)")
    if L < 1:
        raise ValueError("spatial_shapes must describe at least one level, got shape "
                         f"{tuple(spatial_shapes.shape)}")
    require_dim_size("level_start_index", level_start_index, 0, L, "levels in spatial_shapes")
    require_dim_size("sampling_locations", sampling_locations, 0, N, "batch N of value")
    require_dim_size("sampling_locations", sampling_locations, 2, M, "heads M of value")
    require_dim_size("sampling_locations", sampling_locations, 3, L, "levels L of spatial_shapes")
    require_dim_size("sampling_locations", sampling_locations, 5, 2, "(x, y)")
    Lq, P = sampling_locations.shape[1], sampling_locations.shape[4]
    expected = (N, Lq, M, L, P)
    if tuple(attention_weights.shape) != expected:
        raise ValueError(f"attention_weights must have shape [N, Lq, M, L, P] = {expected} "
                         f"(from value and sampling_locations), got {tuple(attention_weights.shape)}")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.device != value.device:
            if t.device.type != "cpu":
                raise ValueError(f"{name} must be on value's device ({value.device}) or the CPU, "
                                 f"got {t.device}")
    if not tracing():
        _check_levels(spatial_shapes, level_start_index, S)
    if spatial_shapes.device != value.device:
        spatial_shapes = spatial_shapes.to(value.device, non_blocking=True)
    if backends.decomposing():
        return reference_forward(value, spatial_shapes, level_start_index, sampling_locations,
                                 attention_weights)
    if level_start_index.device != value.device:
        level_start_index = level_start_index.to(value.device, non_blocking=True)
    return _ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                           attention_weights)
