"""Drop-in replacements for the multi-scale deformable attention entry points of DETR-family code.

Swap the import, keep the call:

    # Deformable-DETR, DINO, DN-DETR, H-DETR (models/ops/functions/ms_deform_attn_func.py)
    from ghostkernels.compat import MSDeformAttnFunction, ms_deform_attn_core_pytorch
    # mmcv / mmdet (mmcv.ops.multi_scale_deform_attn)
    from ghostkernels.compat import (MultiScaleDeformableAttnFunction,
                                     multi_scale_deformable_attn_pytorch)
    # RT-DETR and RT-DETRv2 (src/zoo/rtdetr/utils.py)
    from ghostkernels.compat import (deformable_attention_core_func,
                                     deformable_attention_core_func_v2)

Every entry point runs :func:`ghostkernels.ms_deform_attn` (autograd on every backend, float16 and
bfloat16 as well as float32, torch.compile): the same ``[N, Lq, M*D]`` result as the original.
Differences from the originals, all in the caller's favour: ``im2col_step`` is accepted and ignored
(no chunking, so no rule that it divide the batch); the level shapes may be a tensor of any integer
dtype on any device or, as RT-DETR passes them, a list of ``(h, w)`` pairs; the functions without a
``level_start_index`` argument derive it from the shapes. RT-DETRv2's per-level point counts may
differ between levels (the kernels take one count: the levels with fewer points are padded with
zero-weight points); its ``"discrete"`` sampling method is not provided. Floating-point attention
weights (and sampling locations neither float32 nor of value's dtype) of another dtype than
``value`` are cast to value's dtype, as mmcv's function does: under ``torch.autocast`` the value
projection gives half-precision values while the softmaxed weights stay float32, which the
originals accept (the result is then in value's dtype).
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

from ghostkernels.checks import require_tensor
from ghostkernels.ops.ms_deform_attn import ms_deform_attn

__all__ = ["MSDeformAttnFunction", "MultiScaleDeformableAttnFunction",
           "ms_deform_attn_core_pytorch", "multi_scale_deformable_attn_pytorch",
           "deformable_attention_core_func", "deformable_attention_core_func_v2"]


def _level_shapes(name: str, shapes) -> torch.Tensor:
    """``[L, 2]`` int64 ``(h, w)`` from a tensor (any integer dtype) or a list of pairs."""
    if isinstance(shapes, torch.Tensor):
        if shapes.is_floating_point() or shapes.is_complex():
            raise TypeError(f"{name} must hold integer (h, w) pairs, got dtype {shapes.dtype}")
        return shapes.long()
    try:
        pairs = [tuple(int(v) for v in pair) for pair in shapes]
    except TypeError:
        raise TypeError(f"{name} must be a [L, 2] integer tensor or a sequence of (h, w) pairs, "
                        f"got {type(shapes).__name__}") from None
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"{name} must hold at least one (h, w) pair, got {shapes!r}")
    return torch.tensor(pairs, dtype=torch.int64)


def _level_starts(shapes: torch.Tensor) -> torch.Tensor:
    """Offset of each level in the flattened value: the exclusive prefix sum of h*w."""
    areas = shapes.prod(1)
    return torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


def _level_index(index) -> torch.Tensor:
    require_tensor("value_level_start_index", index)
    if index.is_floating_point() or index.is_complex():
        raise TypeError(f"value_level_start_index must be an integer tensor, got {index.dtype}")
    return index.long()


def _in_value_dtype(value, sampling_locations, attention_weights):
    """``(sampling_locations, attention_weights)`` cast to value's dtype where they are floating
    tensors of another one (sampling locations may stay float32), as mmcv's function casts them
    (``type_as(value)``): under autocast the weights come float32 and the values half. Anything
    else is left for :func:`ms_deform_attn`'s checks to name."""
    if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
        return sampling_locations, attention_weights
    dtype = value.dtype
    if isinstance(attention_weights, torch.Tensor) and attention_weights.is_floating_point() \
            and attention_weights.dtype != dtype:
        attention_weights = attention_weights.to(dtype)
    if isinstance(sampling_locations, torch.Tensor) and sampling_locations.is_floating_point() \
            and sampling_locations.dtype not in (dtype, torch.float32):
        sampling_locations = sampling_locations.to(dtype)
    return sampling_locations, attention_weights


def _check_im2col_step(im2col_step) -> None:
    if isinstance(im2col_step, torch.Tensor) and im2col_step.numel() == 1:
        im2col_step = int(im2col_step)
    if isinstance(im2col_step, bool) or not isinstance(im2col_step, int) or im2col_step < 1:
        raise ValueError(f"im2col_step must be a positive int (it is ignored: the kernels need no "
                         f"chunking), got {im2col_step!r}")


class MSDeformAttnFunction:
    """Deformable-DETR's ``MSDeformAttnFunction``:
    ``MSDeformAttnFunction.apply(value, value_spatial_shapes, value_level_start_index,
    sampling_locations, attention_weights, im2col_step) -> [N, Lq, M*D]``, differentiable in
    value, sampling_locations and attention_weights."""

    @staticmethod
    def apply(value: torch.Tensor, value_spatial_shapes, value_level_start_index,
              sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
              im2col_step: int = 64) -> torch.Tensor:
        _check_im2col_step(im2col_step)
        shapes = _level_shapes("value_spatial_shapes", value_spatial_shapes)
        sampling_locations, attention_weights = _in_value_dtype(value, sampling_locations,
                                                                attention_weights)
        return ms_deform_attn(value, shapes, _level_index(value_level_start_index),
                              sampling_locations, attention_weights)


# mmcv's name for the same function (same argument order)
MultiScaleDeformableAttnFunction = MSDeformAttnFunction


def multi_scale_deformable_attn_pytorch(value: torch.Tensor, value_spatial_shapes,
                                        sampling_locations: torch.Tensor,
                                        attention_weights: torch.Tensor) -> torch.Tensor:
    """mmcv's / Deformable-DETR's PyTorch core, ``(value, value_spatial_shapes,
    sampling_locations, attention_weights) -> [N, Lq, M*D]``, on the fused kernels."""
    shapes = _level_shapes("value_spatial_shapes", value_spatial_shapes)
    sampling_locations, attention_weights = _in_value_dtype(value, sampling_locations,
                                                            attention_weights)
    return ms_deform_attn(value, shapes, _level_starts(shapes), sampling_locations,
                          attention_weights)


# Deformable-DETR's name for the PyTorch core
ms_deform_attn_core_pytorch = multi_scale_deformable_attn_pytorch


def deformable_attention_core_func(value: torch.Tensor,
                                   value_spatial_shapes: torch.Tensor | Sequence,
                                   sampling_locations: torch.Tensor,
                                   attention_weights: torch.Tensor) -> torch.Tensor:
    """RT-DETR's (v1) core: value ``[bs, Len_v, n_head, c]``, ``value_spatial_shapes`` a list of
    ``[h, w]`` (or a tensor), sampling locations ``[bs, Len_q, n_head, n_levels, n_points, 2]``,
    weights ``[bs, Len_q, n_head, n_levels, n_points]`` -> ``[bs, Len_q, n_head * c]``."""
    return multi_scale_deformable_attn_pytorch(value, value_spatial_shapes, sampling_locations,
                                               attention_weights)


@functools.lru_cache(maxsize=16)
def _padded_point_index(counts: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """For levels of ``counts`` points, each padded to ``max(counts)``: the index of every padded
    slot on the concatenated point axis (padding slots point at 0) and whether it is a real point
    (both flat ``[L * max(counts)]``, on the CPU; computed once per ``counts``)."""
    starts = torch.tensor([0, *counts[:-1]]).cumsum(0)
    slot = torch.arange(max(counts))
    valid = slot[None, :] < torch.tensor(counts)[:, None]
    index = torch.where(valid, starts[:, None] + slot[None, :], 0)
    return index.flatten(), valid.flatten()


def deformable_attention_core_func_v2(value: torch.Tensor,
                                      value_spatial_shapes: torch.Tensor | Sequence,
                                      sampling_locations: torch.Tensor,
                                      attention_weights: torch.Tensor,
                                      num_points_list: Sequence[int],
                                      method: str = "default") -> torch.Tensor:
    """RT-DETRv2's core: the points of all levels on one axis, ``sampling_locations``
    ``[bs, Len_q, n_head, sum(num_points_list), 2]`` and ``attention_weights``
    ``[bs, Len_q, n_head, sum(num_points_list)]`` (level-major), ``num_points_list`` the points
    per level -> ``[bs, Len_q, n_head * c]``. Only the bilinear ``"default"`` method."""
    if method != "default":
        raise NotImplementedError(f"method must be 'default' (bilinear sampling); the "
                                  f"{method!r} method of RT-DETRv2 is not provided by ghostkernels")
    counts = [int(p) for p in num_points_list]
    if not counts or min(counts) < 1:
        raise ValueError(f"num_points_list must hold a positive point count per level, "
                         f"got {list(num_points_list)}")
    total = sum(counts)
    for name, t, axis in (("sampling_locations", sampling_locations, -2),
                          ("attention_weights", attention_weights, -1)):
        require_tensor(name, t)
        if t.dim() < 4 or t.shape[axis] != total:
            raise ValueError(f"{name} must have sum(num_points_list) = {total} points on its "
                             f"point axis, got shape {tuple(t.shape)}")
    levels, most = len(counts), max(counts)
    if len(set(counts)) == 1:  # one count per level: a view
        loc = sampling_locations.unflatten(-2, (levels, most))
        weights = attention_weights.unflatten(-1, (levels, most))
    else:  # pad every level to the largest count with zero-weight points
        index, valid = _padded_point_index(tuple(counts))
        index = index.to(sampling_locations.device)
        keep = valid.to(attention_weights.device, attention_weights.dtype)
        loc = sampling_locations.index_select(-2, index).unflatten(-2, (levels, most))
        weights = (attention_weights.index_select(-1, index) * keep).unflatten(-1, (levels, most))
    return multi_scale_deformable_attn_pytorch(value, value_spatial_shapes, loc, weights)
