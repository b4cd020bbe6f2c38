"""Contrastive denoising (CDN) queries of RT-DETR (DINO-style), spec §4.1.

Each group holds ``G`` positive slots (gt boxes with small noise, to be reconstructed) followed by
``G`` negative slots (larger noise, to be classified as background), ``G`` = the largest number of
gts of an image in the batch. DN queries come before the matching queries. A batch without any gt
gets one group of two dummy (padding) queries, never positive, so the computation graph is the same
as for any other batch (the DDP hang of RT-DETR issue #672).
"""
from __future__ import annotations

import torch
from torch import nn

from rtdetr.models.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid

DUMMY_BOX = (0.5, 0.5, 0.1, 0.1)


def denoising_attn_mask(group_size: int, num_group: int, num_queries: int,
                        device=None) -> torch.Tensor:
    """Bool ``[N_dn + Q, N_dn + Q]`` self-attention mask, True = blocked (``N_dn = group_size *
    num_group``): matching queries never see DN queries; a DN group sees only its own DN queries
    and the matching queries."""
    num_dn = group_size * num_group
    size = num_dn + num_queries
    group = torch.arange(size, device=device) // group_size
    is_dn = torch.arange(size, device=device) < num_dn
    other_group = group[:, None] != group[None, :]
    return is_dn[None, :] & (~is_dn[:, None] | other_group)


def contrastive_denoising_group(targets: list[dict], num_classes: int, num_queries: int,
                                class_embed: nn.Embedding, num_denoising: int = 100,
                                label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0):
    """Build the DN queries for a batch.

    Returns ``(dn_content [B, N_dn, C], dn_ref_unact [B, N_dn, 4] (logit-space cxcywh),
    attn_mask [N_dn+Q, N_dn+Q] bool (True = blocked), dn_meta)`` with ``dn_meta =
    {dn_positive_idx: list of B int64 tensors (positive slot of gt j of group g = g*2G + j, ordered
    group by group), dn_num_group, dn_num_split: [N_dn, Q]}``.
    """
    if num_denoising < 1:
        raise ValueError(f"num_denoising must be >= 1 to build DN queries, got {num_denoising}")
    device = class_embed.weight.device
    num_gts = [int(t["labels"].shape[0]) for t in targets]
    batch, max_gt = len(targets), max(num_gts, default=0)
    empty = max_gt == 0
    group_gt = 1 if empty else max_gt
    num_group = 1 if empty else max(1, num_denoising // max_gt)

    labels = torch.full((batch, group_gt), num_classes, dtype=torch.long, device=device)
    boxes = torch.zeros(batch, group_gt, 4, device=device)
    if empty:
        boxes[:] = torch.tensor(DUMMY_BOX, device=device)
    real = torch.zeros(batch, group_gt, dtype=torch.bool, device=device)
    if not empty:  # gt j of image i goes to row i * group_gt + j: one scatter for the batch
        rows = torch.tensor([i * group_gt + j for i, n in enumerate(num_gts) for j in range(n)],
                            dtype=torch.int64, device=device)
        labels.view(-1)[rows] = torch.cat([t["labels"] for t in targets]).to(device)
        boxes.view(-1, 4)[rows] = torch.cat([t["boxes"] for t in targets]).to(device,
                                                                              boxes.dtype)
        real.view(-1)[rows] = True

    # Tile: each group = [G positive slots, G negative slots].
    labels = labels.repeat(1, 2 * num_group)
    boxes = boxes.repeat(1, 2 * num_group, 1)
    real = real.repeat(1, 2 * num_group)
    negative = torch.zeros(batch, 2 * group_gt, 1, device=device)
    negative[:, group_gt:] = 1.0
    negative = negative.repeat(1, num_group, 1)
    # The positive slots of image i, group by group: g * 2G + j for its gts j (the slots where
    # ``real`` holds and ``negative`` does not), built on the host: no mask indexing per image
    # (on a GPU each one a sync).
    slots = torch.tensor([g * 2 * group_gt + j for n in num_gts for g in range(num_group)
                          for j in range(n)], dtype=torch.int64, device=device)
    dn_positive_idx = list(slots.split([n * num_group for n in num_gts]))

    if label_noise_ratio > 0:
        flip = (torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5) & real
        random_labels = torch.randint_like(labels, 0, num_classes)
        labels = torch.where(flip, random_labels, labels)

    if box_noise_scale > 0:
        xyxy = box_cxcywh_to_xyxy(boxes)
        half_size = boxes[..., 2:].repeat(1, 1, 2) * 0.5 * box_noise_scale
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes) + negative  # [0,1) positives, [1,2) negatives
        xyxy = (xyxy + sign * magnitude * half_size).clamp(0.0, 1.0)
        boxes = box_xyxy_to_cxcywh(xyxy)
    dn_ref_unact = inverse_sigmoid(boxes)
    dn_content = class_embed(labels)

    num_dn = labels.shape[1]
    attn_mask = denoising_attn_mask(2 * group_gt, num_group, num_queries, device)
    dn_meta = {"dn_positive_idx": dn_positive_idx, "dn_num_group": num_group,
               "dn_num_split": [num_dn, num_queries]}
    return dn_content, dn_ref_unact, attn_mask, dn_meta
