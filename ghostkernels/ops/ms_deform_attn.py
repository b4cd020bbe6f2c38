"""Multi-scale deformable attention as a PyTorch custom op.

``ghostkernels::ms_deform_attn`` (forward) and ``ghostkernels::ms_deform_attn_backward`` are
``torch.library`` custom ops with fake kernels (torch.compile / torch.export trace through them)
and a registered autograd formula. Each call runs on one backend (see ``ghostkernels.backends``).

Kernel contract, the same for every backend module (``forward`` / ``backward``):
  value [N,S,M,D] (dtype T), spatial_shapes [L,2] int64, level_start_index [L] int64,
  sampling_locations [N,Lq,M,L,P,2] in the accumulation dtype (float64 for T=float64, else
  float32), attention_weights [N,Lq,M,L,P] (dtype T); all contiguous on one device.
  forward(..., softmax=False) -> [N,Lq,M*D] (T). With softmax=True, attention_weights holds
  logits and the kernel applies the softmax over the L*P points of each (n, q, m) itself (in the
  accumulation dtype).
  backward(grad_output [N,Lq,M*D] (T), ..., softmax=False, fixed_point_scale=None) ->
  (grad_value, grad_sampling_locations, grad_attention_weights), each T or float32; with
  softmax=True the third is the gradient w.r.t. the logits. fixed_point_scale None: the normal
  path; a 0-d float64 tensor on the device (:func:`fixed_point_scale`): grad_value accumulated as
  int64 ``trunc(contribution * scale)`` with integer atomics, then divided by the scale, so it is
  bitwise reproducible. Backends deterministic by construction (C++ CPU, the reference) ignore it.
"""
from __future__ import annotations

import torch

from ghostkernels import backends
from ghostkernels.ops.eager import EagerOp, eager_safe, not_twice_differentiable
from ghostkernels.reference.ms_deform_attn import ms_deform_attn_forward as reference_forward
from ghostkernels.reference.ms_deform_attn import level_lists, softmax_over_points
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


def fixed_point_scale(grad_output: torch.Tensor, attention_weights: torch.Tensor, Lq: int,
                      P: int, softmax: bool) -> torch.Tensor:
    """The scale of the deterministic fixed-point grad_value accumulation: a 0-d float64 tensor on
    grad_output's device (tensor ops only: no host sync, CUDA-graph and torch.compile friendly).

    A grad_value element of level l receives at most one contribution per (query, point of level
    l), each with corner weight <= 1, so ``|grad_value| <= bound = Lq * P * max|grad_output| *
    max|w|`` (``max|w| = 1`` with softmax). ``scale = 2**(62 - ceil(log2(bound)))`` keeps every
    partial sum of ``trunc(contribution * scale)`` below ``2**62`` in int64. ``bound == 0`` gives
    1. A non-finite bound (NaN/Inf in grad_output or the weights; NaN or +inf among softmax
    logits, whose -inf entries are legitimate masks) gives NaN, so grad_value comes out all NaN,
    as a float accumulation would propagate it. The exponent is capped at 1023
    (float64's largest) for bounds below ``2**-961``.
    """
    f64 = torch.float64
    max_grad = (grad_output.detach().abs().amax().to(f64) if grad_output.numel()
                else grad_output.new_zeros((), dtype=f64))
    bound = max_grad * (Lq * P)
    if softmax:  # weights <= 1; a NaN or +inf logit makes its weights NaN: poison the scale
        logits = attention_weights.detach()
        poisoned = (logits.isnan() | (logits == float("inf"))).any()
        bound = torch.where(poisoned, torch.full_like(bound, float("nan")), bound)
    else:
        bound = bound * (attention_weights.detach().abs().amax().to(f64)
                         if attention_weights.numel() else 0.0)
    # bound = mantissa * 2**exponent with mantissa in [0.5, 1): ceil(log2(bound)) is the exponent,
    # less one when bound is a power of two (mantissa exactly 0.5). Exact, unlike log2.
    mantissa, exponent = torch.frexp(bound)
    ceil_log2 = exponent.to(f64) - (mantissa == 0.5).to(f64)
    scale = torch.exp2((62.0 - ceil_log2).clamp(max=1023.0))
    scale = torch.where(bound == 0, torch.ones_like(scale), scale)
    return torch.where(torch.isfinite(bound), scale, torch.full_like(scale, float("nan")))


def _ms_deform_attn_impl(value: torch.Tensor, spatial_shapes: torch.Tensor,
                         level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                         attention_weights: torch.Tensor, softmax: bool = False) -> torch.Tensor:
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    if value.is_meta:  # shapes only (as the fake kernel): the level tables need not be readable
        return value.new_empty(N, Lq, M * D)
    if N * Lq * M * D == 0:  # nothing to compute, but a forced backend must be able to run it
        backends.check_forced(OP, value.device, value.dtype)
        return value.new_zeros(N, Lq, M * D)
    args = _kernel_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights)
    kwargs = {"softmax": softmax}
    out = backends.resolve(OP, value.device, value.dtype, args, kwargs).forward(*args, **kwargs)
    return out.to(value.dtype)


_ms_deform_attn = torch.library.custom_op("ghostkernels::ms_deform_attn",
                                          mutates_args=())(_ms_deform_attn_impl)


@_ms_deform_attn.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
      softmax=False):
    N, _, M, D = value.shape
    return value.new_empty(N, sampling_locations.shape[1], M * D)


def _ms_deform_attn_backward_impl(grad_output: torch.Tensor, value: torch.Tensor,
                                  spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                                  sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                                  softmax: bool, deterministic: bool, backend: str = "",
                                  preferred: str = ""
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. value, sampling_locations and attention_weights (the logits when
    ``softmax``). ``deterministic``: grad_value through the fixed-point path (backends whose
    accumulation is deterministic anyway ignore the scale). ``backend``, ``preferred``: the
    backends forced and preferred where the forward ran (``backends.current_choice``; "": none,
    the choice in force here applies): autograd runs the backward of CUDA tensors on its own
    thread, where the forward thread's ``use_backend`` and ``prefer_backend`` are not in force."""
    if value.is_meta:
        return (torch.empty_like(value), torch.empty_like(sampling_locations),
                torch.empty_like(attention_weights))
    with backends.choosing(backend, preferred):  # before the early return: see check_forced
        impl = backends.resolve(OP, value.device, value.dtype)
        if _functorch_wrapped(grad_output, value) and \
                backends.select(OP, value.device, value.dtype) == "triton":
            raise NotImplementedError(
                "ghostkernels.ms_deform_attn: the triton backend's backward cannot run under "
                "torch.func transforms (its launcher needs plain tensors); use the cuda, cpu or "
                "reference backend there (ghostkernels.use_backend)")
    if grad_output.numel() == 0 or value.numel() == 0:
        return (torch.zeros_like(value), torch.zeros_like(sampling_locations),
                torch.zeros_like(attention_weights))
    grad_output = grad_output.to(value.dtype).contiguous()
    inputs = _kernel_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights)
    scale = None
    if deterministic:
        Lq, P = sampling_locations.shape[1], sampling_locations.shape[4]
        scale = fixed_point_scale(grad_output, inputs[4], Lq, P, softmax)
    g_value, g_loc, g_attn = impl.backward(grad_output, *inputs, softmax=softmax,
                                           fixed_point_scale=scale)
    return (g_value.to(value.dtype), g_loc.to(sampling_locations.dtype),
            g_attn.to(attention_weights.dtype))


def _functorch_wrapped(*tensors) -> bool:
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


_ms_deform_attn_backward = torch.library.custom_op(
    "ghostkernels::ms_deform_attn_backward", mutates_args=())(_ms_deform_attn_backward_impl)


@_ms_deform_attn_backward.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
      attention_weights, softmax, deterministic, backend="", preferred=""):
    return (torch.empty_like(value), torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.softmax = inputs[5]
    # The forward thread's choice, for the backward (see _ms_deform_attn_backward_impl)
    ctx.backend, ctx.preferred = (b or "" for b in backends.current_choice())


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = \
        ctx.saved_tensors
    # Read when the backward runs: float atomics make grad_value order-dependent on a GPU only.
    deterministic = torch.are_deterministic_algorithms_enabled() and value.device.type == "cuda"
    args = (grad_output, value, spatial_shapes, level_start_index, sampling_locations,
            attention_weights, ctx.softmax, deterministic, ctx.backend, ctx.preferred)
    backward_op = _ms_deform_attn_backward_impl if eager_safe(args) else _ms_deform_attn_backward
    grads = backward_op(*args)
    if torch.is_grad_enabled():  # create_graph=True: a double backward may follow
        with backends.choosing(ctx.backend, ctx.preferred):
            backend = backends.select(OP, value.device, value.dtype)
        if backend != "reference":  # the kernels' backward has no derivative of its own
            grads = not_twice_differentiable(
                grads, (grad_output, *ctx.saved_tensors),
                f"ghostkernels.ms_deform_attn: the {backend} backend's backward is not "
                "differentiable (a double backward, after create_graph=True); the reference "
                "backend (use_backend('reference')) is, where PyTorch's grid_sample backward is "
                "differentiable (torch 2.14: yes)")
    g_value, g_loc, g_attn = grads
    needs = ctx.needs_input_grad
    return (g_value if needs[0] else None, None, None, g_loc if needs[3] else None,
            g_attn if needs[4] else None, None)


_ms_deform_attn.register_autograd(_backward, setup_context=_setup_context)
_ms_deform_attn_call = EagerOp(_ms_deform_attn, _ms_deform_attn_impl, _setup_context, _backward)


# --------------------------------------------------------------------------------------------
# Public function

def _check_levels(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, S: int) -> None:
    """Value-dependent checks of the level metadata (the host copies of ``level_lists``, read from
    the device once per tensor version)."""
    shapes, starts = level_lists(spatial_shapes, level_start_index)
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


def _checked_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights, weights_name: str):
    """Validate the public arguments (``weights_name``: how the caller names the weights) and
    return them with the level metadata on value's device."""
    for name, t in (("value", value), ("spatial_shapes", spatial_shapes),
                    ("level_start_index", level_start_index),
                    ("sampling_locations", sampling_locations),
                    (weights_name, attention_weights)):
        require_tensor(name, t)
    require_ndim("value", value, 4, "[N, S, M, D]")
    require_ndim("spatial_shapes", spatial_shapes, 2, "[L, 2]")
    require_ndim("level_start_index", level_start_index, 1, "[L]")
    require_ndim("sampling_locations", sampling_locations, 6, "[N, Lq, M, L, P, 2]")
    require_ndim(weights_name, attention_weights, 5, "[N, Lq, M, L, P]")
    require_dtype("value", value, FLOATING)
    require_dtype("spatial_shapes", spatial_shapes, (torch.int64,))
    require_dtype("level_start_index", level_start_index, (torch.int64,))
    require_same_dtype(weights_name, attention_weights, "value", value)
    if sampling_locations.dtype not in (value.dtype, torch.float32):
        raise TypeError(f"sampling_locations must have value's dtype ({dtype_name(value.dtype)}) "
                        f"or float32, got {dtype_name(sampling_locations.dtype)}")
    require_same_device("sampling_locations", sampling_locations, "value", value)
    require_same_device(weights_name, attention_weights, "value", value)
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
        raise ValueError(f"{weights_name} must have shape [N, Lq, M, L, P] = {expected} "
                         f"(from value and sampling_locations), got {tuple(attention_weights.shape)}")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.device != value.device:
            if t.device.type != "cpu":
                raise ValueError(f"{name} must be on value's device ({value.device}) or the CPU, "
                                 f"got {t.device}")
    if not (tracing() or spatial_shapes.is_meta or level_start_index.is_meta):
        _check_levels(spatial_shapes, level_start_index, S)
    if spatial_shapes.device != value.device:
        spatial_shapes = spatial_shapes.to(value.device, non_blocking=True)
    if level_start_index.device != value.device and not backends.decomposing():
        level_start_index = level_start_index.to(value.device, non_blocking=True)
    return value, spatial_shapes, level_start_index, sampling_locations, attention_weights


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

    Under ``torch.use_deterministic_algorithms(True)`` the backward on a GPU accumulates
    grad_value in fixed point (:func:`fixed_point_scale`), so gradients are bitwise
    reproducible.
    """
    args = _checked_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                           attention_weights, "attention_weights")
    if backends.decomposing():
        return reference_forward(*args)
    return _ms_deform_attn_call(*args, False)


def ms_deform_attn_softmax(value: torch.Tensor, spatial_shapes: torch.Tensor,
                           level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                           attention_logits: torch.Tensor) -> torch.Tensor:
    """:func:`ms_deform_attn` with the softmax of the attention weights fused into the kernel.

    ``attention_logits`` ``[N, Lq, M, L, P]`` (value's dtype) are unnormalised: the weights are
    the softmax over the ``L*P`` points of each query and head, computed inside the kernel in the
    accumulation dtype (float32; float64 for float64 values), forward and backward. Equals
    ``ms_deform_attn(..., attention_logits.flatten(-2).softmax(-1).view_as(attention_logits))``
    without materialising the weights. Other arguments and the result as in
    :func:`ms_deform_attn`.
    """
    args = _checked_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                           attention_logits, "attention_logits")
    if backends.decomposing():
        return reference_forward(*args[:4], softmax_over_points(args[4]))
    return _ms_deform_attn_call(*args, True)
