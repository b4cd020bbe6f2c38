"""Backbones of the detector: ``build_backbone(name, **kwargs)``.

Every backbone exposes ``out_channels`` (list), ``out_strides`` ([8, 16, 32]), ``forward(x) ->
list of 3 maps`` and ``reparameterize()`` (fold re-parameterisable branches in place).
"""
from __future__ import annotations

import inspect

from torch import nn

from rtdetr.models.backbone.presnet import PResNet

BACKBONES = ("presnet18", "presnet34", "presnet50", "ghostnetv3")


def build_backbone(name: str, **kwargs) -> nn.Module:
    """``presnet18/34/50`` -> :class:`PResNet`; ``ghostnetv3`` -> ``GhostNetV3`` (imported lazily)."""
    if name.startswith("presnet") and name[len("presnet"):] in ("18", "34", "50"):
        cls, kwargs = PResNet, {"depth": int(name[len("presnet"):]), **kwargs}
    elif name == "ghostnetv3":
        from rtdetr.models.backbone.ghostnetv3 import GhostNetV3
        cls = GhostNetV3
    else:
        raise ValueError(f"backbone name must be one of {BACKBONES}, got {name!r}")
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    for key in kwargs:
        if key not in accepted:
            raise ValueError(f"backbone {name!r} does not take the option {key!r}; "
                             f"it accepts {accepted}")
    return cls(**kwargs)


__all__ = ["BACKBONES", "PResNet", "build_backbone"]
