"""AdamW with parameter groups and a per-iteration LR schedule (spec §5, §9.23).

Groups: backbone parameters (name starts with ``backbone_prefix``) train at ``backbone_lr``; norm
weights and biases (every parameter with fewer than 2 dimensions) get no weight decay. The schedule
is a linear warm-up ``min(1, (step + 1) / warmup_steps)`` times ``gamma ** (milestones passed)``,
milestones given in optimizer steps.
"""
from __future__ import annotations

import bisect
from typing import Sequence

import torch
from torch import nn


def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 backbone_lr: float | None = None, backbone_prefix: str = "backbone.") -> list:
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.removeprefix("module.")
        is_backbone = backbone_lr is not None and name.startswith(backbone_prefix)
        no_decay = p.ndim < 2
        groups.setdefault((is_backbone, no_decay), []).append(p)
    out = []
    for (is_backbone, no_decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": backbone_lr if is_backbone else lr,
                    "weight_decay": 0.0 if no_decay else weight_decay,
                    "name": ("backbone" if is_backbone else "main") +
                            ("_no_decay" if no_decay else "")})
    if not out:
        raise ValueError("model has no trainable parameters")
    return out


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    backbone_lr: float | None = None, betas=(0.9, 0.999),
                    backbone_prefix: str = "backbone.") -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; PyTorch's fused implementation (one kernel per step
    and device instead of a handful of ops per tensor) where every parameter is on a CPU or a
    CUDA device: the training-time GhostNetV3 detector has ~1 150 parameter tensors, and the
    per-tensor loop took 28 ms of a 270 ms demo training step on the development CPU (fused:
    5 ms)."""
    groups = param_groups(model, lr, weight_decay, backbone_lr, backbone_prefix)
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"]) or None
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                             fused=fused)


def lr_factor(step: int, warmup_steps: int, milestones: Sequence[int] = (),
              gamma: float = 0.1) -> float:
    warm = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    return warm * gamma ** bisect.bisect_right(sorted(milestones), step)


def build_scheduler(optimizer, warmup_steps: int, milestones: Sequence[int] = (),
                    gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    milestones = list(milestones)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, milestones, gamma))
