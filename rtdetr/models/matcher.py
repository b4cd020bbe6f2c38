"""Hungarian matching between predictions and ground truth (RT-DETR, spec §4.2).

The cost of giving query q the ground-truth box g is

    C = cost_bbox * L1(box_q, box_g) + cost_class * focal(p_q[label_g]) + cost_giou * -GIoU

with ``p = sigmoid(logits)`` and the focal class cost
``alpha (1-p)^gamma (-log(p + 1e-8)) - (1-alpha) p^gamma (-log(1-p + 1e-8))``.
Each image is solved on its own columns with ``scipy.optimize.linear_sum_assignment``.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from rtdetr.models.box_ops import box_cxcywh_to_xyxy, pairwise_generalized_box_iou
from rtdetr.models.targets import bad_labels, check_labels

Indices = list[tuple[torch.Tensor, torch.Tensor]]
_LOG_EPS = 1e-8


def focal_class_cost(prob: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Focal matching cost from the predicted probabilities of the ground-truth classes."""
    positive = alpha * (1 - prob).pow(gamma) * -torch.log(prob + _LOG_EPS)
    negative = (1 - alpha) * prob.pow(gamma) * -torch.log(1 - prob + _LOG_EPS)
    return positive - negative


def empty_indices(batch_size: int) -> Indices:
    empty = torch.zeros(0, dtype=torch.int64)
    return [(empty, empty) for _ in range(batch_size)]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising the weighted cost above.

    ``forward(outputs, targets)`` takes ``outputs`` with ``pred_logits`` [B,Q,K] and
    ``pred_boxes`` [B,Q,4] (normalised cxcywh) and ``targets``, a list of B dicts with ``labels``
    int64 [n_i] and ``boxes`` [n_i,4] (normalised cxcywh). It returns one pair
    ``(query_index, target_index)`` of int64 CPU tensors of length ``min(Q, n_i)`` per image
    (empty for an image without targets). Runs without gradients, in float32 (float64 kept).
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher needs at least one non-zero cost weight, got "
                             "cost_class=0, cost_bbox=0, cost_giou=0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
                f"cost_giou={self.cost_giou}, alpha={self.alpha}, gamma={self.gamma}")

    @torch.no_grad()
    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                    target_boxes: torch.Tensor) -> torch.Tensor:
        """Cost of every (query, target) pair: logits [N,K], boxes [N,4], labels [M],
        target_boxes [M,4] -> [N,M]."""
        prob = logits.sigmoid()[:, labels]
        class_cost = focal_class_cost(prob, self.alpha, self.gamma)
        l1_cost = torch.cdist(boxes, target_boxes, p=1)
        giou_cost = -pairwise_generalized_box_iou(box_cxcywh_to_xyxy(boxes),
                                                  box_cxcywh_to_xyxy(target_boxes))
        return self.cost_bbox * l1_cost + self.cost_class * class_cost + self.cost_giou * giou_cost

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> Indices:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        batch_size, num_queries = logits.shape[:2]
        if len(targets) != batch_size:
            raise ValueError(f"targets must hold one dict per image ({batch_size}), "
                             f"got {len(targets)}")
        sizes = [_target_size(i, t) for i, t in enumerate(targets)]
        if sum(sizes) == 0:
            return empty_indices(batch_size)
        work = torch.float64 if logits.dtype == torch.float64 else torch.float32
        num_classes = logits.shape[-1]
        labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        # Out-of-range labels are reported after the one host sync below; until then they are
        # clamped, so that indexing never fails (a device assert on a GPU) nor wraps around (-1).
        any_bad_label = bad_labels(labels, num_classes).any()
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(logits.device, work)
        cost = self.cost_matrix(logits.flatten(0, 1).to(work), boxes.flatten(0, 1).to(work),
                                labels.clamp(0, num_classes - 1), target_boxes)
        cost = cost.view(batch_size, num_queries, sum(sizes)).cpu()
        if bool(any_bad_label):
            for image, target in enumerate(targets):  # the first one, named
                check_labels(image, target["labels"].cpu(), num_classes)
        if not torch.isfinite(cost).all():
            raise ValueError("matching cost is not finite: pred_logits or pred_boxes contain "
                             "NaN/inf (or target boxes do)")
        # Image i's block is cost[i, :, its columns]: sliced in NumPy (a view, as before), not
        # with four small torch ops per image.
        cost, indices, start = cost.numpy(), [], 0
        for image, size in enumerate(sizes):
            rows, cols = linear_sum_assignment(cost[image, :, start:start + size])
            start += size
            indices.append((torch.as_tensor(rows, dtype=torch.int64),
                            torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def _target_size(image: int, target: dict) -> int:
    """Number of gts of ``targets[image]``, after checking that labels and boxes agree."""
    labels, boxes = target["labels"], target["boxes"]
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError(f"targets[{image}]['labels'] must be an int64 tensor [n], got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.shape[0] != labels.shape[0]:
        raise ValueError(f"targets[{image}]['boxes'] must have shape [{labels.shape[0]}, 4] "
                         f"(one cxcywh box per label), got {tuple(boxes.shape)}")
    return int(boxes.shape[0])

