"""GhostNetV3 (Liu et al., 2024, arXiv 2404.11202) as an RT-DETR backbone, with exact folding.

Usage::

    net = GhostNetV3(width=1.0, out_indices=(4, 6, 9))   # features at strides 8/16/32
    feats = net(images)             # images: float RGB in [0, 1], NCHW or channels_last
    net.reparameterize()            # eval mode; every branch and conv+BN folded into biased convs
    feats = net(images)             # on ghostkernels.ghost_conv / depthwise_conv for GPU inputs

Images enter in [0, 1]; with ``normalize_input=True`` (default) the ImageNet mean/std that the
official and timm weights expect is applied inside ``forward`` (not folded into the stem: that
would be inexact at the zero-padded border).

Feature taps are outputs of ``blocks[i]`` (spec §2.3): ``blocks[4]`` stride 8, ``blocks[6]``
stride 16, ``blocks[8]`` (last bottleneck) or ``blocks[9]`` (the 1x1 ConvBnAct) stride 32. Without
a classification head (``num_classes=None``) the model only holds the blocks up to the deepest tap.

Weights: ``load_pretrained`` takes the official checkpoint (``state_dict``/``state_dict_ema``
wrapper, ``module.`` prefixes and thop ``total_*`` entries are handled) or a timm ``ghostnetv3_*``
state dict, into the training-time model.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ghostkernels import fold
from rtdetr.models.backbone.ghostnetv3_blocks import (FUSED_OPS_MODES, GhostBottleneckV3,
                                                      conv_relu, make_divisible, runs_fused)

# [kernel, expansion, out, se_ratio, stride] per bottleneck; one inner list per blocks[i] (§2.1)
STAGES = (
    ((3, 16, 16, 0.0, 1),),
    ((3, 48, 24, 0.0, 2),),
    ((3, 72, 24, 0.0, 1),),
    ((5, 72, 40, 0.25, 2),),
    ((5, 120, 40, 0.25, 1),),
    ((3, 240, 80, 0.0, 2),),
    ((3, 200, 80, 0.0, 1), (3, 184, 80, 0.0, 1), (3, 184, 80, 0.0, 1), (3, 480, 112, 0.25, 1),
     (3, 672, 112, 0.25, 1)),
    ((5, 672, 160, 0.25, 2),),
    ((5, 960, 160, 0.0, 1), (5, 960, 160, 0.25, 1), (5, 960, 160, 0.0, 1),
     (5, 960, 160, 0.25, 1)),
)
FINAL_CHANNELS = 960
HEAD_CHANNELS = 1280  # not width-scaled
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WIDTHS = (0.5, 1.0, 1.3, 1.6)


class ConvBnAct(nn.Module):
    """1x1 conv -> BN -> ReLU: ``blocks[9]`` (the official ``ConvBnAct``; not re-parameterised)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.use_fused_ops = False  # set by GhostNetV3.use_fused_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_fused(isinstance(self.bn1, nn.Identity), self.use_fused_ops, x):
            return conv_relu(self.conv, x)
        return F.relu(self.bn1(self.conv(x)))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if isinstance(self.bn1, nn.BatchNorm2d):
            self.conv = fold.fused_conv_bn(self.conv, self.bn1)
            self.bn1 = nn.Identity()


class GhostNetV3(nn.Module):
    """GhostNetV3 backbone (and optional ImageNet classifier) with train-time re-param branches.

    Args:
        width: channel multiplier (0.5, 1.0, 1.3, 1.6 are the published ones; any > 0 works).
        out_indices: increasing ``blocks`` indices (0..9) whose outputs ``forward`` returns.
        num_classes: None for a pure backbone; an int adds the classification head
            (pool -> 1x1 conv 1280 -> ReLU -> dropout -> Linear) used by ``forward_classifier``.
        normalize_input: apply ImageNet mean/std to [0, 1] inputs inside the model.
        drop_rate: dropout before the classifier in training mode (official: 0, timm: 0.2).
    """

    def __init__(self, width: float = 1.0, out_indices: Sequence[int] = (4, 6, 9),
                 num_classes: int | None = None, normalize_input: bool = True,
                 drop_rate: float = 0.0, in_channels: int = 3):
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        out_indices = tuple(int(i) for i in out_indices)
        if (not out_indices or any(not 0 <= i <= len(STAGES) for i in out_indices)
                or list(out_indices) != sorted(set(out_indices))):
            raise ValueError(f"out_indices must be strictly increasing blocks indices in "
                             f"0..{len(STAGES)}, got {out_indices}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {num_classes}")
        self.width, self.out_indices, self.num_classes = width, out_indices, num_classes
        self.in_channels, self.normalize_input = in_channels, normalize_input
        self.drop_rate = drop_rate
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # the same as x * (1 / std) + (-mean / std): one pass (addcmul) on the fused path
        self.register_buffer("norm_scale", 1 / self.std, persistent=False)
        self.register_buffer("norm_shift", -self.mean / self.std, persistent=False)

        stem_ch = make_divisible(16 * width, 4)
        self.conv_stem = nn.Conv2d(in_channels, stem_ch, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_ch)
        last_block = len(STAGES) if num_classes is not None else max(out_indices)
        blocks, channels, strides = [], [], []
        prev, stride, layer_id = stem_ch, 2, 0
        self._dfc_input_strides = []  # input stride of every DFC Ghost module, for min_input_size
        for stage in STAGES[:last_block + 1]:
            layers = []
            for k, exp, out, se_ratio, s in stage:
                out_ch, mid_ch = make_divisible(out * width, 4), make_divisible(exp * width, 4)
                dfc = layer_id > 1
                if dfc:
                    self._dfc_input_strides.append(stride)
                layers.append(GhostBottleneckV3(prev, mid_ch, out_ch, k, s, se_ratio, dfc=dfc))
                prev, stride, layer_id = out_ch, stride * s, layer_id + 1
            blocks.append(nn.Sequential(*layers))
            channels.append(prev)
            strides.append(stride)
        if last_block == len(STAGES):
            final_ch = make_divisible(FINAL_CHANNELS * width, 4)
            blocks.append(nn.Sequential(ConvBnAct(prev, final_ch)))
            channels.append(final_ch)
            strides.append(stride)
        self.blocks = nn.Sequential(*blocks)
        self.block_channels, self.block_strides = channels, strides
        self.out_channels = [channels[i] for i in out_indices]
        self.out_strides = [strides[i] for i in out_indices]
        # every DFC gate average-pools 2x2: its input map needs >= 2 pixels per side
        self.min_input_size = max(self._dfc_input_strides, default=1) + 1

        if num_classes is not None:
            self.conv_head = nn.Conv2d(channels[-1], HEAD_CHANNELS, 1, bias=True)
            self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
        self._use_fused_ops = False
        self.deployed = False

    # ---------------------------------------------------------------------------------- forward

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be a 4-d image batch [B, {self.in_channels}, H, W], "
                             f"got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor (RGB in [0, 1]), got {x.dtype}")
        h, w = x.shape[-2:]
        if min(h, w) < self.min_input_size:
            raise ValueError(f"x must be at least {self.min_input_size}x{self.min_input_size} "
                             f"pixels (total stride {self.block_strides[-1]}; each DFC gate needs "
                             f">= 2 pixels at its input), got {h}x{w}")

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        fused = runs_fused(self.deployed, self._use_fused_ops, x)
        if self.normalize_input:
            if fused:  # one pass over the images instead of two
                x = torch.addcmul(self.norm_shift.to(x.dtype), x, self.norm_scale.to(x.dtype))
            else:
                x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if fused and isinstance(self.bn1, nn.Identity):
            return conv_relu(self.conv_stem, x)
        return F.relu(self.bn1(self.conv_stem(x)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of ``blocks[i]`` for ``i`` in ``out_indices`` (strides ``out_strides``)."""
        x = self._stem(x)
        features = []
        for i, block in enumerate(self.blocks[:self.out_indices[-1] + 1]):
            x = block(x)
            if i in self.out_indices:
                features.append(x)
        return features

    def forward_classifier(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``[B, num_classes]`` (no ``squeeze()``: batch size 1 keeps its dim)."""
        if self.num_classes is None:
            raise ValueError("forward_classifier needs a model built with num_classes, got None")
        x = self.blocks(self._stem(x))
        x = F.relu(self.conv_head(x.mean((2, 3), keepdim=True))).flatten(1)
        if self.drop_rate > 0:
            x = F.dropout(x, self.drop_rate, self.training)
        return self.classifier(x)

    # ------------------------------------------------------------------------------ deployment

    @property
    def use_fused_ops(self):
        """How the folded model runs: True on the ghostkernels ops, False on plain PyTorch convs,
        "auto" (the default after ``reparameterize()``) fused for GPU inputs, plain on the CPU."""
        return self._use_fused_ops

    @use_fused_ops.setter
    def use_fused_ops(self, mode) -> None:
        if not any(mode is m or (isinstance(m, str) and mode == m) for m in FUSED_OPS_MODES):
            raise ValueError(f"use_fused_ops must be True, False or 'auto', got {mode!r}")
        if mode is not False and not self.deployed:
            raise ValueError(f"use_fused_ops={mode!r} needs a folded model; call "
                             f"reparameterize() first")
        self._use_fused_ops = mode
        for m in self.modules():
            if isinstance(m, GhostBottleneckV3):
                m.set_fused_ops(mode)
            elif isinstance(m, ConvBnAct):
                m.use_fused_ops = mode

    @torch.no_grad()
    def reparameterize(self, use_fused_ops: bool | str = "auto", fold_all_bn: bool = True
                       ) -> "GhostNetV3":
        """Fold every re-param branch in place and switch to eval mode; returns self.

        Exact with respect to the eval-mode (running statistics) training-time model.
        ``fold_all_bn`` also folds the conv+BN pairs that the official ``reparameterize()`` keeps
        (stem, DFC gates, shortcuts, ``blocks[9]``); False gives the official deploy graph
        (6.148 M parameters at 1.0x with the head).
        """
        self.eval()
        if not self.deployed:
            if fold_all_bn:
                self.conv_stem = fold.fused_conv_bn(self.conv_stem, self.bn1)
                self.bn1 = nn.Identity()
            for m in [m for m in self.modules() if isinstance(m, GhostBottleneckV3)]:
                m.reparameterize(fold_all_bn)
            if fold_all_bn:
                for m in [m for m in self.modules() if isinstance(m, ConvBnAct)]:
                    m.reparameterize()
            self.deployed = True
        self.use_fused_ops = use_fused_ops
        return self

    # -------------------------------------------------------------------------------- weights

    def load_pretrained(self, checkpoint: Mapping[str, torch.Tensor], prefer_ema: bool = True,
                        ) -> list[str]:
        """Load an official GhostNetV3 checkpoint or a timm ``ghostnetv3_*`` state dict.

        Must be called before ``reparameterize()``. Keys for parts this model does not hold (the
        head, or blocks after the deepest tap of a headless backbone) are skipped and returned.
        Any other missing or unexpected key, or a shape mismatch, raises ValueError listing them.
        """
        if self.deployed:
            raise ValueError("load_pretrained needs the training-time model; load before "
                             "reparameterize() (build, load, then fold)")
        state = to_official_layout(checkpoint, prefer_ema=prefer_ema)
        own = self.state_dict()
        skipped = sorted(k for k in state if k not in own and not self._holds(k))
        state = {k: v for k, v in state.items() if k not in skipped}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                        for k, v in state.items() if k in own and v.shape != own[k].shape)
        if missing or unexpected or shapes:
            raise ValueError(
                f"checkpoint does not match GhostNetV3(width={self.width}): "
                f"{len(missing)} missing keys {_preview(missing)}, {len(unexpected)} unexpected "
                f"keys {_preview(unexpected)}, {len(shapes)} shape mismatches {_preview(shapes)}")
        self.load_state_dict(state, strict=True)
        return skipped

    def _holds(self, key: str) -> bool:
        """Whether ``key`` names a part this architecture could have (head / later blocks)."""
        if key.startswith(("conv_head.", "classifier.")):
            return self.num_classes is not None
        if key.startswith("blocks."):
            return int(key.split(".")[1]) < len(self.blocks)
        return True


def _preview(keys: list[str], n: int = 8) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"


def to_official_layout(checkpoint: Mapping[str, torch.Tensor], prefer_ema: bool = True
                       ) -> dict[str, torch.Tensor]:
    """Normalise an official or timm GhostNetV3 checkpoint to the official key layout.

    Official release: ``{"state_dict": ..., "state_dict_ema": ...}`` (EMA preferred: 77.13 % vs
    76.93 % top-1 at 1.0x), possibly ``module.`` prefixes and thop ``total_ops``/``total_params``.
    timm: re-param branches name their BN ``bn1`` where the official code says ``bn``.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a mapping (state dict), "
                        f"got {type(checkpoint).__name__}")
    wrappers = ("state_dict_ema", "state_dict") if prefer_ema else ("state_dict", "state_dict_ema")
    for key in wrappers:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    state = {}
    for key, value in checkpoint.items():
        if key.endswith(("total_ops", "total_params")):
            continue
        if key.startswith("module."):
            key = key[len("module."):]
        if (".ghost" in key or ".dw_rpr_" in key) and ".bn1." in key:
            key = key.replace(".bn1.", ".bn.")
        state[key] = value
    return state
