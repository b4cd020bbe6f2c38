"""Exponential moving average of a model (RT-DETR ``ModelEMA``, spec §5 and §9.22).

Every update: ``d = decay * (1 - exp(-updates / warmups))``; ``ema = d * ema + (1 - d) * model`` over
all floating-point ``state_dict`` entries (parameters and BN running statistics); integer buffers
are copied. Evaluation and export use the EMA weights.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a DDP (or similar ``.module``) wrapper."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) \
        else model


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmups: int = 2000):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if warmups < 0:
            raise ValueError(f"warmups must be >= 0, got {warmups}")
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmups, self.updates = decay, warmups, 0

    def current_decay(self) -> float:
        if self.warmups == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-self.updates / self.warmups))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        # keep_vars: the tensors themselves (state_dict() would detach all 2215 of the demo
        # model's, twice per update); everything here runs under no_grad.
        src = unwrap(model).state_dict(keep_vars=True)
        averaged, values, copied, sources = [], [], [], []
        for name, ema_value in self.module.state_dict(keep_vars=True).items():
            value = src[name]
            if ema_value.dtype.is_floating_point:
                averaged.append(ema_value)
                values.append(value if value.dtype == ema_value.dtype
                              else value.to(ema_value.dtype))
            else:
                copied.append(ema_value)
                sources.append(value)
        # The same mul_, add_ and copy_ per tensor, as one multi-tensor call each: a detector has
        # thousands of small state tensors, each op a launch on a GPU.
        if averaged:
            torch._foreach_mul_(averaged, d)
            torch._foreach_add_(averaged, values, alpha=1.0 - d)
        if copied:
            torch._foreach_copy_(copied, sources)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates,
                "decay": self.decay, "warmups": self.warmups}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
