"""PResNet: ResNet-vd (deep 3-conv stem, avg-pool shortcut) as the RT-DETR backbone.

Module names follow RT-DETR's ``presnet.py`` (``conv1.conv1_1``, ``res_layers.i.blocks.j.branch2a``,
``short.conv``...) so its Paddle-converted ImageNet checkpoints load unchanged.
Interface shared with every backbone of the detector: ``out_channels``, ``out_strides``,
``forward(x) -> list of feature maps`` and ``reparameterize()`` (here: every conv+BN, frozen or
not, folded into one biased conv).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from ghostkernels.fold import fused_conv_bn

DEPTHS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
STAGE_WIDTHS = (64, 128, 256, 512)
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, None: nn.Identity}


def make_activation(name: str | None) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(map(str, ACTIVATIONS))}, got {name!r}")
    return ACTIVATIONS[name]()


class ConvNorm(nn.Module):
    """Conv2d (no bias, 'same' padding for odd k) -> BatchNorm2d -> activation."""

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, stride: int = 1,
                 act: str | None = None):
        super().__init__()
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, (kernel_size - 1) // 2,
                              bias=False)
        self.norm = nn.BatchNorm2d(ch_out)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the norm (eval statistics) into a biased conv; the norm becomes an Identity.
        Idempotent."""
        if isinstance(self.norm, nn.Identity):
            return
        self.conv = fused_conv_bn(self.conv, self.norm)
        self.norm = nn.Identity()


def _shortcut(ch_in: int, ch_out: int, stride: int) -> nn.Module:
    """vd projection shortcut: AvgPool(2, ceil) + 1x1 conv when striding, else a strided 1x1."""
    if stride == 2:
        return nn.Sequential(OrderedDict([
            ("pool", nn.AvgPool2d(2, 2, 0, ceil_mode=True)),
            ("conv", ConvNorm(ch_in, ch_out, 1, 1))]))
    return ConvNorm(ch_in, ch_out, 1, stride)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, ch_in: int, ch_out: int, stride: int, project: bool, act: str):
        super().__init__()
        self.short = _shortcut(ch_in, ch_out, stride) if project else None
        self.branch2a = ConvNorm(ch_in, ch_out, 3, stride, act)
        self.branch2b = ConvNorm(ch_out, ch_out, 3, 1, None)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = x if self.short is None else self.short(x)
        return self.act(self.branch2b(self.branch2a(x)) + short)


class BottleNeck(nn.Module):
    expansion = 4

    def __init__(self, ch_in: int, ch_out: int, stride: int, project: bool, act: str):
        super().__init__()
        self.branch2a = ConvNorm(ch_in, ch_out, 1, 1, act)
        self.branch2b = ConvNorm(ch_out, ch_out, 3, stride, act)  # vd: stride on the 3x3
        self.branch2c = ConvNorm(ch_out, ch_out * 4, 1, 1, None)
        self.short = _shortcut(ch_in, ch_out * 4, stride) if project else None
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = x if self.short is None else self.short(x)
        return self.act(self.branch2c(self.branch2b(self.branch2a(x))) + short)


class Blocks(nn.Module):
    def __init__(self, block, ch_in: int, ch_out: int, count: int, stage: int, act: str):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            stride = 2 if i == 0 and stage != 0 else 1
            # The first block of every stage projects, even R18's 64 -> 64 stage 0.
            self.blocks.append(block(ch_in, ch_out, stride, project=(i == 0), act=act))
            ch_in = ch_out * block.expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _freeze_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below ``module`` by a FrozenBatchNorm2d with the same statistics."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(getattr(module, name).detach())
        return frozen
    for name, child in module.named_children():
        new = _freeze_norm(child)
        if new is not child:
            setattr(module, name, new)
    return module


class PResNet(nn.Module):
    """ResNet-vd. ``return_idx`` picks stages (0..3, strides 4/8/16/32); RT-DETR uses [1, 2, 3].

    ``freeze_at``: -1 trains everything; k >= 0 freezes the stem and the first k stages.
    ``freeze_norm``: every BatchNorm2d becomes FrozenBatchNorm2d (R50/R101 configs).
    ``pretrained``: optional path of a local state_dict in RT-DETR's key layout (never downloaded).
    """

    def __init__(self, depth: int = 18, return_idx: Sequence[int] = (1, 2, 3), act: str = "relu",
                 freeze_at: int = -1, freeze_norm: bool = False, pretrained: str | None = None):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth}")
        return_idx = list(return_idx)
        if not return_idx or sorted(set(return_idx)) != return_idx or \
                not all(0 <= i <= 3 for i in return_idx):
            raise ValueError(f"return_idx must be increasing stage indices in 0..3, got {return_idx}")
        self.depth, self.return_idx = depth, return_idx
        self.conv1 = nn.Sequential(OrderedDict([
            ("conv1_1", ConvNorm(3, 32, 3, 2, act)),
            ("conv1_2", ConvNorm(32, 32, 3, 1, act)),
            ("conv1_3", ConvNorm(32, 64, 3, 1, act))]))
        self.pool = nn.MaxPool2d(3, 2, 1)
        block = BasicBlock if depth < 50 else BottleNeck
        ch_in, channels = 64, []
        self.res_layers = nn.ModuleList()
        for stage, (count, width) in enumerate(zip(DEPTHS[depth], STAGE_WIDTHS)):
            self.res_layers.append(Blocks(block, ch_in, width, count, stage, act))
            ch_in = width * block.expansion
            channels.append(ch_in)
        self.out_channels = [channels[i] for i in return_idx]
        self.out_strides = [4 * 2 ** i for i in return_idx]
        if pretrained:
            self.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True))
        if freeze_at >= 0:
            for module in [self.conv1, *self.res_layers[:min(freeze_at, 4)]]:
                module.requires_grad_(False)
        if freeze_norm:
            _freeze_norm(self)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold every conv+BN (frozen or not) into one biased conv, with the eval statistics."""
        for module in self.modules():
            if isinstance(module, ConvNorm):
                module.reparameterize()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.pool(self.conv1(x))
        outs = []
        for i, layer in enumerate(self.res_layers):
            x = layer(x)
            if i in self.return_idx:
                outs.append(x)
            if i == self.return_idx[-1]:
                break
        return outs
