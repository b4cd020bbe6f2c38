"""Box conversions, IoU / GIoU and ``inverse_sigmoid``.

Boxes are ``[..., 4]`` tensors, either ``cxcywh`` (normalised centre and size, the model's
convention) or ``xyxy`` (corners). IoU functions expect ``xyxy`` boxes with ``x2 >= x1`` and
``y2 >= y1`` (always true for boxes converted from ``cxcywh`` with non-negative sizes). They are
degenerate-safe: a ratio whose denominator is exactly zero (zero-area boxes: lines or points) is
defined as 0, with zero gradient through that ratio, so values and gradients stay finite; every
other result is the plain formula.

``pairwise`` functions compare every box of ``a`` [N,4] with every box of ``b`` [M,4] -> [N,M];
``paired`` functions compare ``a[i]`` with ``b[i]`` -> [N] (what a loss on matched pairs needs).
"""
from __future__ import annotations

import torch

# RT-DETR's inverse_sigmoid clips both sides of the ratio at this value (spec §9.1).
INVERSE_SIGMOID_EPS = 1e-5


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of ``xyxy`` boxes ``[..., 4]`` -> ``[...]``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def inverse_sigmoid(x: torch.Tensor, eps: float = INVERSE_SIGMOID_EPS) -> torch.Tensor:
    """``log(x / (1 - x))`` with x clipped to [0, 1] and both sides clipped below at ``eps``.

    0 and 1 map to ``-log(1/eps)`` and ``+log(1/eps)`` (about -/+11.51 for eps=1e-5). float16
    input is computed in float32 (``x / eps`` overflows float16's 65504 near 1) and returned in
    float16."""
    if x.dtype == torch.float16:
        return inverse_sigmoid(x.float(), eps).to(torch.float16)
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, 0 where the denominator is 0 (the double ``where`` keeps the
    gradient of the unused branch finite too)."""
    positive = denominator > 0
    safe = torch.where(positive, denominator, torch.ones_like(denominator))
    return torch.where(positive, numerator / safe, torch.zeros_like(numerator))


def _check_boxes(name: str, boxes) -> None:
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of xyxy boxes, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [N, 4] (xyxy boxes), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {boxes.dtype}")


def _intersection_union(a: torch.Tensor, b: torch.Tensor):
    """Intersection and union of broadcastable xyxy boxes ``a`` and ``b``."""
    top_left = torch.maximum(a[..., :2], b[..., :2])
    bottom_right = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter, union


def _enclosing_area(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    top_left = torch.minimum(a[..., :2], b[..., :2])
    bottom_right = torch.maximum(a[..., 2:], b[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _iou_and_giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inter, union = _intersection_union(a, b)
    enclosing = _enclosing_area(a, b)
    iou = _safe_divide(inter, union)
    return iou, iou - _safe_divide(enclosing - union, enclosing)


def _giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _iou_and_giou(a, b)[1]


def pairwise_box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and union of every pair of xyxy boxes: ``a`` [N,4], ``b`` [M,4] -> ([N,M], [N,M])."""
    _check_boxes("a", a)
    _check_boxes("b", b)
    inter, union = _intersection_union(a[:, None, :], b[None, :, :])
    return _safe_divide(inter, union), union


def pairwise_generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of every pair of xyxy boxes: ``a`` [N,4], ``b`` [M,4] -> [N,M] in [-1,1]."""
    _check_boxes("a", a)
    _check_boxes("b", b)
    return _giou(a[:, None, :], b[None, :, :])


def _check_paired(a: torch.Tensor, b: torch.Tensor) -> None:
    _check_boxes("a", a)
    _check_boxes("b", b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired boxes need as many rows in b as in a ({a.shape[0]}), "
                         f"got {b.shape[0]}")


def paired_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of ``a[i]`` with ``b[i]`` for xyxy boxes ``a``, ``b`` [N,4] -> [N]."""
    _check_paired(a, b)
    inter, union = _intersection_union(a, b)
    return _safe_divide(inter, union)


def paired_generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of ``a[i]`` with ``b[i]`` for xyxy boxes ``a``, ``b`` [N,4] -> [N]."""
    _check_paired(a, b)
    return _giou(a, b)


def paired_box_iou_and_giou(a: torch.Tensor,
                            b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(paired_box_iou(a, b), paired_generalized_box_iou(a, b))`` from one intersection and
    union: the criterion needs both for the same pairs (IoU as the varifocal target, GIoU for the
    loss), and each costs a dozen small ops. The values are those of the two functions."""
    _check_paired(a, b)
    return _iou_and_giou(a, b)
