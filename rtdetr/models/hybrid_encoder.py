"""HybridEncoder of RT-DETR: input projections, AIFI on the stride-32 map, CCFM fusion.

Inputs: backbone maps at strides 8/16/32. Output: three maps of ``hidden_dim`` channels at the
same strides. RepVGG blocks fold into one 3x3 conv with :meth:`RepVggBlock.reparameterize`.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ghostkernels.fold import conv_with, fold_conv_bn, pad_kernel_to, sum_branches
from rtdetr.models.backbone.presnet import ConvNorm, make_activation
from rtdetr.models.size_cache import cached

MAX_POSITION_CACHE = 8  # cached AIFI position embeddings (sizes x devices x dtypes) per encoder


def sincos_position_embedding(height: int, width: int, dim: int, temperature: float = 10000.0,
                              device=None, dtype=torch.float32) -> torch.Tensor:
    """2-D sin-cos embedding ``[1, height*width, dim]`` for a row-major (y*W + x) flattened map.

    Channels: [sin(y*w), cos(y*w), sin(x*w), cos(x*w)] with ``w_i = 1/temperature^(i/(dim/4))`` and
    raw integer coordinates. Identical to RT-DETR's embedding on square maps (first half = row);
    on non-square maps every token gets its own (row, column), unlike the official code.
    """
    if dim % 4 != 0:
        raise ValueError(f"dim must be divisible by 4 for the 2-D sin-cos embedding, got {dim}")
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float64, device=device) / pos_dim)
    grid_y, grid_x = torch.meshgrid(torch.arange(height, dtype=torch.float64, device=device),
                                    torch.arange(width, dtype=torch.float64, device=device),
                                    indexing="ij")
    out_y = grid_y.flatten()[:, None] * omega[None]
    out_x = grid_x.flatten()[:, None] * omega[None]
    pe = torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)
    return pe[None].to(dtype)


class RepVggBlock(nn.Module):
    """act(3x3 ConvNorm + 1x1 ConvNorm); no identity branch. Folds into one biased 3x3 conv."""

    def __init__(self, ch_in: int, ch_out: int, act: str = "silu"):
        super().__init__()
        self.ch_in, self.ch_out = ch_in, ch_out
        self.conv1 = ConvNorm(ch_in, ch_out, 3, 1, None)
        self.conv2 = ConvNorm(ch_in, ch_out, 1, 1, None)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv"):
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.conv2(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold both branches (BN in eval statistics) into ``self.conv``; idempotent."""
        if hasattr(self, "conv"):
            return
        kxk = fold_conv_bn(self.conv1.conv.weight, self.conv1.norm)
        k1, b1 = fold_conv_bn(self.conv2.conv.weight, self.conv2.norm)
        weight, bias = sum_branches([kxk, (pad_kernel_to(k1, 3), b1)])
        self.conv = conv_with(self.conv1.conv, weight, bias)
        del self.conv1, self.conv2


class CSPRepLayer(nn.Module):
    def __init__(self, ch_in: int, ch_out: int, num_blocks: int = 3, expansion: float = 1.0,
                 act: str = "silu"):
        super().__init__()
        hidden = int(ch_out * expansion)
        self.conv1 = ConvNorm(ch_in, hidden, 1, 1, act)
        self.conv2 = ConvNorm(ch_in, hidden, 1, 1, act)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden, hidden, act)
                                           for _ in range(num_blocks)])
        self.conv3 = ConvNorm(hidden, ch_out, 1, 1, act) if hidden != ch_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class TransformerEncoderLayer(nn.Module):
    """Post-norm self-attention layer; the positional embedding goes to query and key only."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float = 0.0,
                 activation: str = "gelu"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = make_activation(activation)

    def forward(self, src: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        q = k = src + pos_embed
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, value=src, need_weights=False)[0]))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class TransformerEncoder(nn.Module):
    def __init__(self, layer: TransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])

    def forward(self, src: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos_embed)
        return src


class HybridEncoder(nn.Module):
    def __init__(self, in_channels: Sequence[int] = (512, 1024, 2048),
                 feat_strides: Sequence[int] = (8, 16, 32), hidden_dim: int = 256, nhead: int = 8,
                 dim_feedforward: int = 1024, dropout: float = 0.0, enc_act: str = "gelu",
                 use_encoder_idx: Sequence[int] = (2,), num_encoder_layers: int = 1,
                 pe_temperature: float = 10000.0, expansion: float = 1.0, depth_mult: float = 1.0,
                 act: str = "silu"):
        super().__init__()
        if len(in_channels) != len(feat_strides):
            raise ValueError(f"in_channels and feat_strides must have the same length, got "
                             f"{list(in_channels)} and {list(feat_strides)}")
        if any(not 0 <= i < len(in_channels) for i in use_encoder_idx):
            raise ValueError(f"use_encoder_idx must index the {len(in_channels)} levels, "
                             f"got {list(use_encoder_idx)}")
        self.in_channels, self.feat_strides = list(in_channels), list(feat_strides)
        self.hidden_dim, self.pe_temperature = hidden_dim, pe_temperature
        self.use_encoder_idx = list(use_encoder_idx)
        self.out_channels = [hidden_dim] * len(in_channels)
        self.out_strides = list(feat_strides)
        self.input_proj = nn.ModuleList(ConvNorm(c, hidden_dim, 1) for c in in_channels)
        layer = TransformerEncoderLayer(hidden_dim, nhead, dim_feedforward, dropout, enc_act)
        self.encoder = nn.ModuleList(TransformerEncoder(layer, num_encoder_layers)
                                     for _ in self.use_encoder_idx)
        blocks = round(3 * depth_mult)
        n = len(in_channels)
        self.lateral_convs = nn.ModuleList(ConvNorm(hidden_dim, hidden_dim, 1, 1, act)
                                           for _ in range(n - 1))
        self.fpn_blocks = nn.ModuleList(CSPRepLayer(2 * hidden_dim, hidden_dim, blocks, expansion, act)
                                        for _ in range(n - 1))
        self.downsample_convs = nn.ModuleList(ConvNorm(hidden_dim, hidden_dim, 3, 2, act)
                                              for _ in range(n - 1))
        self.pan_blocks = nn.ModuleList(CSPRepLayer(2 * hidden_dim, hidden_dim, blocks, expansion, act)
                                        for _ in range(n - 1))
        self._position_cache: dict = {}

    def position_embedding(self, height: int, width: int, device, dtype) -> torch.Tensor:
        """The AIFI layer's sin-cos embedding for a height x width map, cached per size, device
        and dtype: a constant, so a forward does not rebuild it (a dozen small kernels on a GPU)."""
        if height < 1 or width < 1:
            raise ValueError(f"height and width must be positive, got {height} x {width}")
        return cached(self._position_cache, (height, width, str(device), dtype),
                      lambda: sincos_position_embedding(height, width, self.hidden_dim,
                                                        self.pe_temperature, device, dtype),
                      MAX_POSITION_CACHE)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"feats must be a list of {len(self.in_channels)} maps, got {len(feats)}")
        for i, (f, c) in enumerate(zip(feats, self.in_channels)):
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(f"feats[{i}] must have shape [B, {c}, H, W], got {tuple(f.shape)}")
        proj = [p(f) for p, f in zip(self.input_proj, feats)]
        for encoder, idx in zip(self.encoder, self.use_encoder_idx):
            b, c, h, w = proj[idx].shape
            tokens = proj[idx].flatten(2).permute(0, 2, 1)  # [B, H*W, C], row-major
            pos = self.position_embedding(h, w, tokens.device, tokens.dtype)
            tokens = encoder(tokens, pos)
            # back in the map's own memory format (the view is channels_last-strided; a plain
            # .contiguous() would turn a channels_last model's whole FPN/PAN NCHW)
            fmt = (torch.channels_last if proj[idx].is_contiguous(memory_format=torch.channels_last)
                   else torch.contiguous_format)
            proj[idx] = tokens.permute(0, 2, 1).reshape(b, c, h, w).contiguous(memory_format=fmt)

        inner = [proj[-1]]  # top-down (FPN); the lateral output replaces the stored top feature
        for k, idx in enumerate(range(len(proj) - 1, 0, -1)):
            top = self.lateral_convs[k](inner[0])
            inner[0] = top
            up = F.interpolate(top, size=proj[idx - 1].shape[-2:], mode="nearest")
            inner.insert(0, self.fpn_blocks[k](torch.cat([up, proj[idx - 1]], dim=1)))

        outs = [inner[0]]  # bottom-up (PAN)
        for k in range(len(proj) - 1):
            down = self.downsample_convs[k](outs[-1])
            outs.append(self.pan_blocks[k](torch.cat([down, inner[k + 1]], dim=1)))
        return outs
