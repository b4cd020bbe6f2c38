"""RT-DETR training losses (spec §4.3): varifocal loss, L1 and GIoU on matched pairs, for the
final decoder layer, every auxiliary decoder layer, the encoder top-k and the denoising queries.

Model outputs (the interface with ``rtdetr.models.rtdetr``):

- ``pred_logits`` [B,Q,K], ``pred_boxes`` [B,Q,4] (normalised cxcywh): last decoder layer,
  matching queries only (the denoising part is split off by the decoder);
- ``aux_outputs``: list of dicts with the same keys, one per earlier decoder layer. In the v1
  layout the encoder top-k is appended here as the last entry; it is matched and scored like a
  decoder layer, so both layouts work;
- ``enc_aux_outputs`` (v2 layout): list of dicts for the encoder top-k, with optional
  ``enc_meta = {"class_agnostic": bool}`` (class-agnostic: one logit, every label is 0);
- ``dn_aux_outputs`` + ``dn_meta`` (training with denoising): list with one dict per decoder
  layer holding the denoising queries, and ``dn_meta = {"dn_positive_idx": [LongTensor per
  image], "dn_num_group": int, "dn_num_split": [N_dn, Q]}``. ``dn_meta`` may be None (no DN).

Loss names: ``loss_vfl``, ``loss_bbox``, ``loss_giou`` plus a suffix ``_aux_{i}`` (decoder layer
i, or the v1 encoder entry), ``_enc_{i}`` (v2 encoder) or ``_dn_{i}`` (denoising, layer i). The
returned values are already multiplied by ``weight_dict``; the training loss is their plain sum.
Losses are computed in float32 (float64 inputs stay float64), outside any autocast region.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn

from rtdetr.models.box_ops import box_cxcywh_to_xyxy, paired_box_iou_and_giou
from rtdetr.models.matcher import HungarianMatcher, Indices

# rtdetr_r18vd_6x_coco (spec §2.1): vfl 1, bbox 5, giou 2; VFL alpha 0.75, gamma 2.
DEFAULT_WEIGHTS = {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def loss_dtype(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def average_num_boxes(targets: list[dict], device: torch.device) -> float:
    """Ground-truth boxes per rank: the batch count averaged over all ranks when
    torch.distributed is initialised, clamped to at least 1."""
    count = torch.tensor([float(sum(int(t["labels"].shape[0]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return max(float(count.item()), 1.0)


class TargetBatch(NamedTuple):
    """The targets of a batch concatenated once per criterion call: ``labels`` [M] and ``boxes``
    [M, 4] on the loss device, and ``offsets[i]``, the row of image i's first target."""
    labels: torch.Tensor
    boxes: torch.Tensor
    offsets: list[int]


class MatchedPairs(NamedTuple):
    """Every matched (query, ground truth) pair as flat tensors, in the order of the ``Indices``
    they come from (image by image): the image, query, ground-truth label and box of each."""
    images: torch.Tensor
    queries: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor


def concat_targets(targets: list[dict], device) -> TargetBatch:
    offsets, row = [], 0
    for t in targets:
        offsets.append(row)
        row += int(t["labels"].shape[0])
    return TargetBatch(torch.cat([t["labels"] for t in targets]).to(device),
                       torch.cat([t["boxes"] for t in targets]).to(device), offsets)


def matched_pairs(batch: TargetBatch, indices: Indices, device) -> MatchedPairs:
    """The pairs of ``indices`` gathered from ``batch`` with a handful of ops whatever the batch
    size (the per-image gathers this replaces were ~80 small ops per output; the demo's criterion
    scores 5 outputs of 8 images a step). Image and target-row numbers are built where the
    indices are (the CPU, from the matcher) and reach ``device`` in one copy."""
    images, offsets = [], []
    for image, (queries, _) in enumerate(indices):
        count = int(queries.shape[0])
        images += [image] * count
        offsets += [batch.offsets[image]] * count
    queries = torch.cat([q for q, _ in indices])
    numbers = torch.tensor([images, offsets], dtype=torch.int64, device=queries.device)
    rows = numbers[1] + torch.cat([gt for _, gt in indices])
    images, queries, rows = torch.stack([numbers[0], queries, rows]).to(device).unbind()
    return MatchedPairs(images, queries, batch.labels[rows], batch.boxes[rows])


def _varifocal(logits: torch.Tensor, pairs: MatchedPairs, iou: torch.Tensor, num_boxes: float,
               alpha: float, gamma: float) -> torch.Tensor:
    images, queries, labels = pairs.images, pairs.queries, pairs.labels
    positive = torch.zeros_like(logits)
    positive[images, queries, labels] = 1.0
    target_score = torch.zeros_like(logits)
    target_score[images, queries, labels] = iou.to(logits.dtype)
    weight = alpha * logits.detach().sigmoid().pow(gamma) * (1 - positive) + target_score
    loss = F.binary_cross_entropy_with_logits(logits, target_score, weight=weight,
                                              reduction="none")
    return loss.sum() / num_boxes


def _box_terms(boxes: torch.Tensor, pairs: MatchedPairs, num_boxes: float):
    """(L1, 1 - GIoU, detached IoU of each pair) over the matched pairs, the sums divided by
    ``num_boxes``: the matched boxes gathered and converted once, one intersection/union giving
    both the IoU (the varifocal target) and the GIoU."""
    predicted = boxes[pairs.images, pairs.queries]
    gt_boxes = pairs.boxes.to(boxes.dtype)
    l1 = F.l1_loss(predicted, gt_boxes, reduction="none").sum() / num_boxes
    iou, giou = paired_box_iou_and_giou(box_cxcywh_to_xyxy(predicted),
                                        box_cxcywh_to_xyxy(gt_boxes))
    return l1, (1 - giou).sum() / num_boxes, iou.detach()


def pair_losses(logits: torch.Tensor, boxes: torch.Tensor, pairs: MatchedPairs,
                num_boxes: float, alpha: float = 0.75,
                gamma: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(varifocal, L1, 1 - GIoU) of one output over its matched ``pairs`` (see
    :func:`varifocal_loss` and :func:`box_losses`)."""
    l1, giou, iou = _box_terms(boxes, pairs, num_boxes)
    return _varifocal(logits, pairs, iou, num_boxes, alpha, gamma), l1, giou


def varifocal_loss(logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict],
                   indices: Indices, num_boxes: float, alpha: float = 0.75,
                   gamma: float = 2.0) -> torch.Tensor:
    """IoU-aware varifocal loss summed over all queries and classes, divided by ``num_boxes``.

    The target of the matched class of a matched query is the (detached) IoU of its box with the
    ground truth, every other target is 0; the weight is that IoU on positives and
    ``alpha * sigmoid(logit)^gamma`` (detached) on everything else."""
    pairs = matched_pairs(concat_targets(targets, logits.device), indices, logits.device)
    return pair_losses(logits, boxes, pairs, num_boxes, alpha, gamma)[0]


def box_losses(boxes: torch.Tensor, targets: list[dict], indices: Indices,
               num_boxes: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, 1 - GIoU) over the matched pairs, each summed and divided by ``num_boxes``. With no
    pairs both are 0 but still part of the graph (gradients are zeros, never missing)."""
    pairs = matched_pairs(concat_targets(targets, boxes.device), indices, boxes.device)
    return _box_terms(boxes, pairs, num_boxes)[:2]


def denoising_indices(dn_meta: dict, targets: list[dict]) -> Indices:
    """Fixed denoising pairs: image i's positive slots ``dn_positive_idx[i]`` paired with its
    ground-truth indices ``0..n_i-1`` repeated once per denoising group."""
    positive_idx, groups = dn_meta["dn_positive_idx"], int(dn_meta["dn_num_group"])
    if len(positive_idx) != len(targets):
        raise ValueError(f"dn_meta['dn_positive_idx'] must hold one tensor per image "
                         f"({len(targets)}), got {len(positive_idx)}")
    indices = []
    for image, (slots, target) in enumerate(zip(positive_idx, targets)):
        num_gt = int(target["labels"].shape[0])
        if slots.numel() != num_gt * groups:
            raise ValueError(f"dn_meta['dn_positive_idx'][{image}] must hold n_gt * dn_num_group "
                             f"= {num_gt} * {groups} slots, got {slots.numel()}")
        gt = torch.arange(num_gt, dtype=torch.int64).repeat(groups)
        indices.append((slots.to(torch.int64), gt.to(slots.device)))
    return indices


class RTDETRCriterion(nn.Module):
    """``forward(outputs, targets) -> {name: weighted loss}`` (see the module docstring)."""

    def __init__(self, num_classes: int, matcher: nn.Module | None = None,
                 weight_dict: dict[str, float] | None = None, alpha: float = 0.75,
                 gamma: float = 2.0):
        super().__init__()
        weights = dict(DEFAULT_WEIGHTS if weight_dict is None else weight_dict)
        if set(weights) != set(DEFAULT_WEIGHTS):
            raise ValueError(f"weight_dict must have exactly the keys {sorted(DEFAULT_WEIGHTS)}, "
                             f"got {sorted(weights)}")
        self.num_classes = num_classes
        self.matcher = HungarianMatcher() if matcher is None else matcher
        self.weight_dict = weights
        self.alpha, self.gamma = alpha, gamma

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, weight_dict={self.weight_dict}, "
                f"alpha={self.alpha}, gamma={self.gamma}")

    def output_losses(self, output: dict, targets: list[dict], indices: Indices,
                      num_boxes: float, suffix: str = "") -> dict[str, torch.Tensor]:
        """Weighted VFL, L1 and GIoU of one output dict for given matching ``indices``."""
        device = output["pred_logits"].device
        pairs = matched_pairs(concat_targets(targets, device), indices, device)
        return self._pair_losses(output, pairs, num_boxes, suffix)

    def _pair_losses(self, output: dict, pairs: MatchedPairs, num_boxes: float,
                     suffix: str) -> dict[str, torch.Tensor]:
        logits, boxes = loss_dtype(output["pred_logits"]), loss_dtype(output["pred_boxes"])
        vfl, l1, giou = pair_losses(logits, boxes, pairs, num_boxes, self.alpha, self.gamma)
        raw = {"loss_vfl": vfl, "loss_bbox": l1, "loss_giou": giou}
        return {name + suffix: self.weight_dict[name] * value for name, value in raw.items()}

    def _matched_losses(self, output, targets, batch, num_boxes, suffix, num_classes, where):
        if output["pred_logits"].shape[-1] != num_classes:
            raise ValueError(f"{where}['pred_logits'] must have {num_classes} classes in its "
                             f"last dimension, got shape {tuple(output['pred_logits'].shape)}")
        indices = self.matcher(output, targets)
        pairs = matched_pairs(batch, indices, output["pred_logits"].device)
        return self._pair_losses(output, pairs, num_boxes, suffix)

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        device = outputs["pred_logits"].device
        num_boxes = average_num_boxes(targets, device)
        batch = concat_targets(targets, device)  # once for every output scored below
        losses = self._matched_losses(outputs, targets, batch, num_boxes, "", self.num_classes,
                                      "outputs")
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            losses.update(self._matched_losses(aux, targets, batch, num_boxes, f"_aux_{i}",
                                               self.num_classes, f"aux_outputs[{i}]"))
        losses.update(self._encoder_losses(outputs, targets, batch, num_boxes))
        losses.update(self._denoising_losses(outputs, targets, batch, num_boxes))
        return losses

    def _encoder_losses(self, outputs, targets, batch, num_boxes):
        agnostic = bool((outputs.get("enc_meta") or {}).get("class_agnostic", False))
        if agnostic:  # one logit: every ground truth is class 0 (also for matching)
            targets = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]}
                       for t in targets]
            batch = batch._replace(labels=torch.zeros_like(batch.labels))
        losses = {}
        for i, enc in enumerate(outputs.get("enc_aux_outputs") or []):
            losses.update(self._matched_losses(enc, targets, batch, num_boxes, f"_enc_{i}",
                                               1 if agnostic else self.num_classes,
                                               f"enc_aux_outputs[{i}]"))
        return losses

    def _denoising_losses(self, outputs, targets, batch, num_boxes):
        dn_meta = outputs.get("dn_meta")
        if dn_meta is None:
            return {}
        dn_outputs = outputs.get("dn_aux_outputs")
        if not dn_outputs:
            raise ValueError("outputs has dn_meta but no dn_aux_outputs (one dict per decoder "
                             "layer with the denoising queries)")
        num_dn, num_queries = (int(n) for n in dn_meta["dn_num_split"])
        if outputs["pred_logits"].shape[1] != num_queries:
            raise ValueError(f"pred_logits must hold the {num_queries} matching queries only "
                             f"(dn_num_split={[num_dn, num_queries]}), got shape "
                             f"{tuple(outputs['pred_logits'].shape)}")
        # The same pairs for every decoder layer: gathered once.
        pairs = matched_pairs(batch, denoising_indices(dn_meta, targets),
                              outputs["pred_logits"].device)
        dn_num_boxes = num_boxes * int(dn_meta["dn_num_group"])
        losses = {}
        for i, dn in enumerate(dn_outputs):
            if dn["pred_logits"].shape[1] != num_dn:
                raise ValueError(f"dn_aux_outputs[{i}]['pred_logits'] must hold the {num_dn} "
                                 f"denoising queries, got shape {tuple(dn['pred_logits'].shape)}")
            losses.update(self._pair_losses(dn, pairs, dn_num_boxes, f"_dn_{i}"))
        return losses
