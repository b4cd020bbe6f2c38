"""Reference multi-scale deformable attention: the grid_sample formulation.

This *defines* the op. Per level, the value map ``[N*M, D, H, W]`` is sampled bilinearly at the
points ``2*loc - 1`` (zero padding, ``align_corners=False``: pixel coordinate ``loc*size - 0.5``),
weighted by the attention weights and summed over levels and points.
"""
import weakref

import torch
import torch.nn.functional as F

# Host copies of level tables: key -> (weak refs to the very tensors read, shapes, starts)
_level_lists: dict[tuple, tuple] = {}


def level_lists(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor
                ) -> tuple[list[tuple[int, int]], list[int]]:
    """``spatial_shapes`` and ``level_start_index`` as Python lists, read from the device once per
    tensor version: repeated calls copy nothing, so a CUDA graph can capture the reference after
    one warm-up call (a device-to-host copy cannot be captured). Tracers (compile, export, fake
    tensors) read the tensors directly, and so does every call with an inference tensor (made under
    ``torch.inference_mode()``: it has no version counter to tell a changed table)."""
    def read():
        return ([(int(h), int(w)) for h, w in spatial_shapes.tolist()],
                [int(s) for s in level_start_index.tolist()])

    plain = type(spatial_shapes) is torch.Tensor and type(level_start_index) is torch.Tensor
    # torch.func transforms wrap tensors (no storage: data_ptr() raises) under type torch.Tensor
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    plain = plain and not (wrapped(spatial_shapes) or wrapped(level_start_index))
    if not plain or torch.compiler.is_compiling() or spatial_shapes.is_inference() \
            or level_start_index.is_inference():
        return read()
    key = (spatial_shapes.data_ptr(), spatial_shapes._version, tuple(spatial_shapes.shape),
           spatial_shapes.device, level_start_index.data_ptr(), level_start_index._version,
           tuple(level_start_index.shape))
    hit = _level_lists.get(key)
    if hit is not None and hit[0]() is spatial_shapes and hit[1]() is level_start_index:
        return hit[2], hit[3]
    shapes, starts = read()
    if len(_level_lists) > 1024:
        _level_lists.clear()
    _level_lists[key] = (weakref.ref(spatial_shapes), weakref.ref(level_start_index), shapes,
                         starts)
    return shapes, starts


def ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations,
                           attention_weights):
    """value [N,S,M,D], spatial_shapes [L,2] (h,w), level_start_index [L],
    sampling_locations [N,Lq,M,L,P,2] (x,y in [0,1]), attention_weights [N,Lq,M,L,P]
    -> [N,Lq,M*D] in value's dtype (float32 arithmetic for half inputs)."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    out_dtype = value.dtype
    # Half-precision inputs are computed in float32 (the accumulation dtype of every backend).
    dtype = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    value = value.to(dtype)
    grids = 2.0 * sampling_locations.to(dtype) - 1.0  # [N,Lq,M,L,P,2]
    # A point at +-inf or NaN (or whose coordinate overflows) lies outside every map: it samples
    # zero with zero gradients, as in the compiled kernels; grid_sample would give NaN (its corner
    # weights are inf - inf). Every point beyond +-3 (pixel <= -1.5 or >= size + 0.5: outside
    # anyway) or NaN moves to -3, with a zero gradient; the others are untouched. Three
    # elementwise ops (Abs, LessOrEqual, Where in ONNX), small next to the sampling.
    grids = torch.where(grids.abs() <= 3.0, grids, -3.0)
    shapes, starts = level_lists(spatial_shapes, level_start_index)
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, starts[lvl]:starts[lvl] + h * w]  # [N, h*w, M, D]
        v = v.permute(0, 2, 3, 1).reshape(N * M, D, h, w)
        g = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(N * M, Lq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [N*M, D, Lq, P]
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # [N*M, D, Lq, L*P]
    weights = attention_weights.to(dtype).permute(0, 2, 1, 3, 4).reshape(N * M, 1, Lq, L * P)
    out = (stacked * weights).sum(-1)  # [N*M, D, Lq]
    return out.view(N, M * D, Lq).transpose(1, 2).to(out_dtype).contiguous()


def softmax_over_points(attention_logits):
    """[N,Lq,M,L,P] logits -> weights softmaxed over the L*P points of each query and head, in the
    accumulation dtype (float64 for float64 logits, else float32)."""
    dtype = torch.float64 if attention_logits.dtype == torch.float64 else torch.float32
    flat = attention_logits.to(dtype).flatten(-2)
    return flat.softmax(-1).view(attention_logits.shape)


def forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            softmax=False):
    if softmax:
        attention_weights = softmax_over_points(attention_weights)
    return ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights)


def backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
             attention_weights, softmax=False, fixed_point_scale=None):
    """Gradients of the reference forward (torch.func.vjp: this runs inside a custom op, below
    the autograd dispatch key, where torch.autograd.grad cannot record a graph). With softmax the
    third gradient is w.r.t. the logits. fixed_point_scale is ignored: this path has no atomics
    on the CPU (on a GPU, grid_sample's own backward decides)."""
    def f(v, loc, w):
        return forward(v, spatial_shapes, level_start_index, loc, w, softmax=softmax)

    _, vjp = torch.func.vjp(f, value, sampling_locations, attention_weights)
    return vjp(grad_output.to(value.dtype))
