"""The RT-DETR detector: backbone -> HybridEncoder -> decoder (spec §1).

``forward(images, targets=None)``: images float RGB in [0, 1], ``[B, 3, H, W]`` (NCHW or
channels_last), any size whose stride-32 map is at least 1x1 and whose maps hold at least
``num_queries`` positions; targets (training) a list of dicts ``{labels int64 [n], boxes float
[n, 4] normalised cxcywh}``, validated before anything runs. Multi-scale training is the data
loader's job (v2), not the model's. ``deploy()`` folds every re-parameterisable block in eval mode.
"""
from __future__ import annotations

import torch
from torch import nn

from rtdetr.models.targets import validate_targets

# Per-image metadata that data pipelines commonly attach to targets; the model ignores it.
TARGET_METADATA_KEYS = ("image_id", "orig_size", "size", "area", "iscrowd")


def reparameterize_all(module: nn.Module) -> None:
    """Call ``reparameterize()`` on every outermost submodule that has one (a backbone folds its
    own blocks; each block is folded exactly once)."""
    for child in module.children():
        if callable(getattr(child, "reparameterize", None)):
            child.reparameterize()
        else:
            reparameterize_all(child)


class RTDETR(nn.Module):
    def __init__(self, backbone: nn.Module, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.backbone, self.encoder, self.decoder = backbone, encoder, decoder

    @property
    def num_classes(self) -> int:
        return self.decoder.num_classes

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None) -> dict:
        if self.training and targets is not None:
            validate_targets(targets, self.num_classes, _batch_size(images),
                             extra_keys=TARGET_METADATA_KEYS)
        _check_images(images, next(self.parameters(), None))
        return self.decoder(self.encoder(self.backbone(images)), targets)

    def deploy(self) -> "RTDETR":
        """Eval mode, then fold the backbone (``reparameterize()``) and every RepVGG block.
        Outputs equal the unfolded model's in eval mode (up to float rounding)."""
        self.eval()
        reparameterize_all(self)
        return self


def _batch_size(images) -> int | None:
    return images.shape[0] if isinstance(images, torch.Tensor) and images.dim() == 4 else None


def _check_images(images, param: torch.Tensor | None = None) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B, 3, H, W] (RGB), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor with values in [0, 1], "
                        f"got {images.dtype}")
    if param is None:
        return
    if images.device != param.device:
        raise ValueError(f"images must be on the model's device ({param.device}), "
                         f"got {images.device}")
    # Under autocast the convolutions cast their (not float64) inputs; otherwise a dtype
    # mismatch fails deep inside the backbone without naming the images.
    autocast = torch.is_autocast_enabled(images.device.type) and images.dtype != torch.float64
    if images.dtype != param.dtype and not autocast:
        raise TypeError(f"images must have the model's dtype ({param.dtype}; or run under "
                        f"torch.autocast), got {images.dtype}")
