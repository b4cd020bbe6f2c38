"""Re-parameterisation math: fold conv+BN pairs and parallel branches into one conv.

Shared by every re-parameterised block (GhostNetV3's Ghost modules and stride-2 depthwise convs,
RT-DETR's RepVGG blocks). Each function returns a ``(weight, bias)`` pair of plain tensors; the
caller builds the deployed conv. Everything is exact in eval mode, because a BatchNorm with running
statistics is an affine map per channel:

    bn(y) = (y - mean) * t + beta,   t = gamma / sqrt(running_var + eps)

so ``bn(conv(x, W) + c) = conv(x, W * t) + (c - mean) * t + beta``. A branch is folded with the
stride, padding and groups of the conv it is merged into; kernels of different sizes are aligned by
centring the smaller one (zero padding), which is exact when each branch pads by ``k // 2``.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["bn_scale_shift", "fold_conv_bn", "fold_bn_identity", "identity_kernel",
           "pad_kernel_to", "sum_branches", "fused_conv_bn", "conv_with"]


def _pair(name: str, kernel_size) -> tuple[int, int]:
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size, kernel_size)
    kernel_size = tuple(kernel_size)
    if len(kernel_size) != 2 or any(not isinstance(k, int) or k < 1 or k % 2 == 0
                                    for k in kernel_size):
        raise ValueError(f"{name} must be an odd positive int or a pair of them, "
                         f"got {kernel_size!r}")
    return kernel_size


def _is_frozen_bn(bn) -> bool:
    """A frozen BatchNorm (torchvision.ops.FrozenBatchNorm2d and look-alikes): the four fixed
    per-channel buffers and ``eps``, always applied as in eval mode."""
    return isinstance(bn, nn.Module) and all(
        isinstance(getattr(bn, name, None), torch.Tensor)
        for name in ("weight", "bias", "running_mean", "running_var")) and hasattr(bn, "eps")


def bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BatchNorm as ``y * scale + shift`` per channel (its own eps, running stats).

    ``bn``: a BatchNorm module, or a frozen one (torchvision's FrozenBatchNorm2d). Returns
    ``(scale, shift)`` of shape ``[C]``. A BatchNorm without affine parameters uses gamma = 1,
    beta = 0. One without running statistics has no eval-mode affine form: ValueError.
    """
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) and not _is_frozen_bn(bn):
        raise TypeError(f"bn must be a BatchNorm module (or a FrozenBatchNorm2d), "
                        f"got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn must track running statistics (track_running_stats=True) to be "
                         "folded; it has none")
    mean, var = bn.running_mean, bn.running_var
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def fold_conv_bn(weight: torch.Tensor, bn: nn.Module,
                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``bn(conv(x, weight) + bias)`` into one conv: returns ``(weight', bias')``.

    ``weight`` is ``[Cout, Cin/groups, kh, kw]`` (any conv, grouped or not); ``bias`` ``[Cout]`` or
    None; ``bn`` (a BatchNorm or FrozenBatchNorm2d) has ``Cout`` channels.
    """
    if weight.dim() != 4:
        raise ValueError(f"weight must be a 4-d conv kernel [Cout, Cin/groups, kh, kw], "
                         f"got shape {tuple(weight.shape)}")
    scale, shift = bn_scale_shift(bn)
    if scale.numel() != weight.shape[0]:
        raise ValueError(f"bn must have as many channels as the conv's outputs "
                         f"({weight.shape[0]}), got num_features={scale.numel()}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    folded_bias = shift if bias is None else bias * scale + shift
    return weight * scale.reshape(-1, 1, 1, 1), folded_bias


def identity_kernel(channels: int, groups: int, kernel_size, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The kernel of a conv (``channels -> channels``, ``groups``) that returns its input.

    Shape ``[channels, channels // groups, kh, kw]``: output channel ``i`` takes input channel
    ``i`` of its group (index ``i % (channels // groups)``) at the centre tap. Depthwise
    (groups = channels) gives a 1 at the centre of every filter; dense (groups = 1) the identity
    matrix at the centre. Used for BN-only identity branches.
    """
    kh, kw = _pair("kernel_size", kernel_size)
    if channels < 1 or groups < 1 or channels % groups:
        raise ValueError(f"channels must be a positive multiple of groups, "
                         f"got channels={channels}, "
                         f"groups={groups}")
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kh, kw, dtype=dtype, device=device)
    rows = torch.arange(channels, device=device)
    kernel[rows, rows % per_group, kh // 2, kw // 2] = 1
    return kernel


def fold_bn_identity(bn: nn.modules.batchnorm._BatchNorm, groups: int,
                     kernel_size) -> tuple[torch.Tensor, torch.Tensor]:
    """A BN-only identity branch ``bn(x)`` as a conv with ``groups`` and ``kernel_size``."""
    ref = bn.running_mean if bn.running_mean is not None else bn.weight
    kernel = identity_kernel(bn.num_features, groups, kernel_size,
                             dtype=ref.dtype if ref is not None else torch.float32,
                             device=ref.device if ref is not None else None)
    return fold_conv_bn(kernel, bn)


def pad_kernel_to(weight: torch.Tensor, kernel_size) -> torch.Tensor:
    """Zero-pad a conv kernel ``[Cout, Cin/g, h, w]`` (odd h, w) to ``kernel_size``, centred.

    A ``h x w`` conv with padding ``(h//2, w//2)`` equals the padded ``kh x kw`` conv with padding
    ``(kh//2, kw//2)`` at every stride: both sample the same centre pixel (e.g. a 1x1 stride-2
    branch with padding 0 and a 5x5 stride-2 conv with padding 2 read pixel (2i, 2j) at the centre).
    """
    kh, kw = _pair("kernel_size", kernel_size)
    if weight.dim() != 4:
        raise ValueError(f"weight must be a 4-d conv kernel, got shape {tuple(weight.shape)}")
    h, w = weight.shape[-2:]
    if h % 2 == 0 or w % 2 == 0 or h > kh or w > kw:
        raise ValueError(f"weight's spatial size must be odd and at most kernel_size "
                         f"{(kh, kw)}, got {(h, w)}")
    ph, pw = (kh - h) // 2, (kw - w) // 2
    return torch.nn.functional.pad(weight, [pw, pw, ph, ph])


def sum_branches(branches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum parallel branches given as ``(weight, bias)`` pairs of equal shapes (already aligned)."""
    branches = list(branches)
    if not branches:
        raise ValueError("branches must contain at least one (weight, bias) pair, got none")
    weight, bias = branches[0]
    for i, (w, b) in enumerate(branches[1:], start=1):
        if w.shape != weight.shape or b.shape != bias.shape:
            raise ValueError(f"branch {i} must have weight shape {tuple(weight.shape)} and bias "
                             f"shape {tuple(bias.shape)} like branch 0, got {tuple(w.shape)} and "
                             f"{tuple(b.shape)} (pad smaller kernels with pad_kernel_to first)")
        weight, bias = weight + w, bias + b
    return weight, bias


def fused_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A new ``nn.Conv2d`` (with bias, same geometry) equal to ``bn(conv(x))`` in eval mode."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    weight, bias = fold_conv_bn(conv.weight, bn, conv.bias)
    return conv_with(conv, weight, bias)


def conv_with(template: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A new biased ``nn.Conv2d`` with ``template``'s stride, padding (and padding_mode), dilation
    and groups, and its weight's memory format (a model converted to channels_last stays so when
    folded).

    ``weight`` must have the template's kernel size (pad smaller branch kernels first).
    """
    out_ch, in_per_group, kh, kw = weight.shape
    if (kh, kw) != tuple(template.kernel_size):
        raise ValueError(f"weight must have the template's kernel size "
                         f"{tuple(template.kernel_size)}, got {(kh, kw)}")
    conv = nn.Conv2d(in_per_group * template.groups, out_ch, (kh, kw), stride=template.stride,
                     padding=template.padding, dilation=template.dilation,
                     groups=template.groups, bias=True, padding_mode=template.padding_mode,
                     device=weight.device, dtype=weight.dtype)
    if template.weight.is_contiguous(memory_format=torch.channels_last) \
            and not template.weight.is_contiguous():
        conv = conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv
