"""RT-DETR decoder: query selection from the encoder memory, contrastive denoising and
deformable-attention decoder layers with logit-space box refinement (spec §1.3-§1.4, v2 semantics).

Output dict (training): ``pred_logits [B,Q,K]``, ``pred_boxes [B,Q,4]`` (sigmoid cxcywh),
``aux_outputs`` (decoder layers 0..L-2), ``enc_aux_outputs`` (one dict: the encoder top-k, v2
layout), ``enc_meta``; with denoising also ``dn_aux_outputs`` (every layer, DN part) and
``dn_meta``. Eval: ``pred_logits`` and ``pred_boxes`` of layer ``eval_idx`` only.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from ghostkernels.nn import MSDeformAttn
from rtdetr.models.backbone.presnet import ConvNorm, make_activation
from rtdetr.models.box_ops import inverse_sigmoid
from rtdetr.models.denoising import contrastive_denoising_group
from rtdetr.models.size_cache import cached

PRIOR_PROB = 0.01
MAX_ANCHOR_CACHE = 8


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else self.act(layer(x))
        return x


class DecoderLayer(nn.Module):
    """Post-norm: self-attention (q = k = tgt + pos), deformable cross-attention, FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 activation: str, n_levels: int, n_points: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, nhead, n_points, offset_scale=0.5)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = make_activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.linear1.weight)  # v2
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, tgt, reference, memory, spatial_shapes, level_start_index, attn_mask,
                query_pos):
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, value=tgt, attn_mask=attn_mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attn))
        cross = self.cross_attn(tgt + query_pos, reference, memory, spatial_shapes,
                                level_start_index)
        tgt = self.norm2(tgt + self.dropout2(cross))
        ffn = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class RTDETRDecoder(nn.Module):
    def __init__(self, num_classes: int = 80, feat_channels: Sequence[int] = (256, 256, 256),
                 feat_strides: Sequence[int] = (8, 16, 32), hidden_dim: int = 256,
                 num_levels: int = 3, num_queries: int = 300, nhead: int = 8,
                 num_points: int = 4, num_decoder_layers: int = 6, dim_feedforward: int = 1024,
                 dropout: float = 0.0, activation: str = "relu", num_denoising: int = 100,
                 label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0,
                 learnt_init_query: bool = False, eval_idx: int = -1, eps: float = 1e-2,
                 aux_loss: bool = True):
        super().__init__()
        if len(feat_channels) > num_levels or len(feat_channels) != len(feat_strides):
            raise ValueError(f"feat_channels ({list(feat_channels)}) and feat_strides "
                             f"({list(feat_strides)}) must have equal length <= num_levels "
                             f"({num_levels})")
        if num_queries < 1 or num_decoder_layers < 1:
            raise ValueError(f"num_queries and num_decoder_layers must be >= 1, got "
                             f"{num_queries} and {num_decoder_layers}")
        if not -num_decoder_layers <= eval_idx < num_decoder_layers:
            raise ValueError(f"eval_idx must index the {num_decoder_layers} decoder layers, "
                             f"got {eval_idx}")
        self.num_classes, self.hidden_dim = num_classes, hidden_dim
        self.num_levels, self.num_queries = num_levels, num_queries
        self.feat_channels = list(feat_channels)
        self.num_denoising, self.label_noise_ratio = num_denoising, label_noise_ratio
        self.box_noise_scale, self.eps, self.aux_loss = box_noise_scale, eps, aux_loss
        self.eval_idx = eval_idx % num_decoder_layers
        self.learnt_init_query = learnt_init_query

        self.input_proj = nn.ModuleList(ConvNorm(c, hidden_dim, 1) for c in feat_channels)
        ch = feat_channels[-1]
        for _ in range(num_levels - len(feat_channels)):  # extra levels: 3x3 stride-2 conv + BN
            self.input_proj.append(ConvNorm(ch, hidden_dim, 3, 2))
            ch = hidden_dim

        layer_args = (hidden_dim, nhead, dim_feedforward, dropout, activation, num_levels, num_points)
        self.layers = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(num_decoder_layers))
        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim,
                                                      padding_idx=num_classes)
        if learnt_init_query:
            self.tgt_embed = nn.Embedding(num_queries, hidden_dim)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2)
        self.enc_output = nn.Sequential(OrderedDict([("proj", nn.Linear(hidden_dim, hidden_dim)),
                                                     ("norm", nn.LayerNorm(hidden_dim))]))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.dec_score_head = nn.ModuleList(nn.Linear(hidden_dim, num_classes)
                                            for _ in range(num_decoder_layers))
        self.dec_bbox_head = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, 3)
                                           for _ in range(num_decoder_layers))
        self._anchor_cache: dict = {}
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
        for head in [self.enc_score_head, *self.dec_score_head]:
            nn.init.constant_(head.bias, bias)
        for mlp in [self.enc_bbox_head, *self.dec_bbox_head]:
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        nn.init.xavier_uniform_(self.enc_output.proj.weight)
        if self.learnt_init_query:
            nn.init.xavier_uniform_(self.tgt_embed.weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj.conv.weight)
        if self.num_denoising > 0:  # v2: N(0, 1) except the zero padding row
            nn.init.normal_(self.denoising_class_embed.weight[:-1])
            with torch.no_grad():
                self.denoising_class_embed.weight[-1].zero_()

    # ---------------------------------------------------------------- anchors
    def anchors(self, spatial_shapes: Sequence[tuple[int, int]], device, dtype=torch.float32):
        """Logit-space anchors ``[1, S, 4]`` (invalid -> +inf) and valid mask ``[1, S, 1]`` for the
        given (h, w) per level; cached per size (at most a few sizes)."""
        key = (tuple(map(tuple, spatial_shapes)), str(device), dtype)
        return cached(self._anchor_cache, key,
                      lambda: generate_anchors(spatial_shapes, self.eps, device, dtype),
                      MAX_ANCHOR_CACHE)

    def level_metadata(self, spatial_shapes: Sequence[tuple[int, int]], device):
        """``spatial_shapes`` [L, 2] and ``level_start_index`` [L] as int64 tensors on
        ``device``, cached per size: no host-to-device copy per forward (CUDA-graph capturable)."""
        def build():
            shapes = torch.tensor(spatial_shapes, dtype=torch.long, device=device)
            return shapes, torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
        key = ("levels", tuple(map(tuple, spatial_shapes)), str(device))
        return cached(self._anchor_cache, key, build, MAX_ANCHOR_CACHE)

    # ---------------------------------------------------------------- forward
    def _flatten_memory(self, feats: Sequence[torch.Tensor]):
        if len(feats) != len(self.feat_channels):
            raise ValueError(f"feats must be a list of {len(self.feat_channels)} maps, "
                             f"got {len(feats)}")
        maps = [proj(f) for proj, f in zip(self.input_proj, feats)]
        for proj in self.input_proj[len(feats):]:
            maps.append(proj(maps[-1] if len(maps) > len(feats) else feats[-1]))
        shapes = [tuple(m.shape[-2:]) for m in maps]
        memory = torch.cat([m.flatten(2).permute(0, 2, 1) for m in maps], dim=1)
        return memory, shapes

    def _select_queries(self, memory: torch.Tensor, shapes):
        # Under autocast the anchors stay float32, as in the official model: the reference boxes
        # and every refined box are then float32 (each box head's half-precision delta is added
        # to a float32 logit); in float16 / bfloat16 they would round to ~0.3 / ~2.5 px at 640.
        # A model converted to half precision (no autocast) stays in its own dtype.
        autocast = torch.is_autocast_enabled(memory.device.type) \
            and memory.dtype in (torch.float16, torch.bfloat16)
        anchors, valid_mask = self.anchors(shapes, memory.device,
                                           torch.float32 if autocast else memory.dtype)
        valid_mask = valid_mask.to(memory.dtype)
        if memory.shape[1] < self.num_queries:
            raise ValueError(f"the input is too small for num_queries={self.num_queries}: its "
                             f"feature maps {shapes} hold only {memory.shape[1]} positions")
        output_memory = self.enc_output(memory * valid_mask)
        enc_logits = self.enc_score_head(output_memory)
        index = enc_logits.max(-1).values.topk(self.num_queries, dim=1).indices[..., None]
        topk_memory = output_memory.gather(1, index.expand(-1, -1, output_memory.shape[-1]))
        # The box head works row by row, so it runs on the selected rows only (num_queries of S:
        # 300 of 8400 at 640x640), which equals selecting its output for every row.
        ref_unact = self.enc_bbox_head(topk_memory) + anchors.expand(
            memory.shape[0], -1, -1).gather(1, index.expand(-1, -1, 4))
        enc_topk_logits = enc_logits.gather(1, index.expand(-1, -1, enc_logits.shape[-1]))
        if self.learnt_init_query:
            content = self.tgt_embed.weight[None].expand(memory.shape[0], -1, -1)
        else:
            content = topk_memory.detach()
        return content, ref_unact, enc_topk_logits

    def forward(self, feats: Sequence[torch.Tensor], targets: list[dict] | None = None) -> dict:
        memory, shapes = self._flatten_memory(feats)
        spatial_shapes, level_start_index = self.level_metadata(shapes, memory.device)
        content, ref_unact, enc_topk_logits = self._select_queries(memory, shapes)
        enc_topk_bboxes = ref_unact.sigmoid()  # not detached: trains the encoder heads

        attn_mask, dn_meta = None, None
        ref_unact = ref_unact.detach()
        if self.training and self.num_denoising > 0 and targets is not None:
            dn_content, dn_ref_unact, attn_mask, dn_meta = contrastive_denoising_group(
                targets, self.num_classes, self.num_queries, self.denoising_class_embed,
                self.num_denoising, self.label_noise_ratio, self.box_noise_scale)
            content = torch.cat([dn_content.to(content.dtype), content], dim=1)
            ref_unact = torch.cat([dn_ref_unact.to(ref_unact.dtype), ref_unact], dim=1)

        logits, boxes = self._decode(content, ref_unact, memory, spatial_shapes,
                                     level_start_index, attn_mask)
        if not self.training:
            return {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if dn_meta is not None:
            num_dn = dn_meta["dn_num_split"][0]
            dn_logits, logits = [x[:, :num_dn] for x in logits], [x[:, num_dn:] for x in logits]
            dn_boxes, boxes = [x[:, :num_dn] for x in boxes], [x[:, num_dn:] for x in boxes]
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = _pairs(logits[:-1], boxes[:-1])
            out["enc_aux_outputs"] = _pairs([enc_topk_logits], [enc_topk_bboxes])
            out["enc_meta"] = {"class_agnostic": False}
            if dn_meta is not None:
                out["dn_aux_outputs"] = _pairs(dn_logits, dn_boxes)
        if dn_meta is not None:
            out["dn_meta"] = dn_meta
        return out

    def _decode(self, tgt, ref_unact, memory, spatial_shapes, level_start_index, attn_mask):
        """Iterative refinement. Layer i's loss box is recomputed from layer i-1's *non-detached*
        box ("look forward twice"); the next layer's reference is detached. Eval runs layers up to
        ``eval_idx`` and scores only that one."""
        ref = ref_unact.sigmoid()  # detached initial reference
        ref_detached, prev_box = ref, None
        logits, boxes = [], []
        for i, layer in enumerate(self.layers):
            tgt = layer(tgt, ref_detached.unsqueeze(2), memory, spatial_shapes, level_start_index,
                        attn_mask, self.query_pos_head(ref_detached))
            delta = self.dec_bbox_head[i](tgt)
            box = torch.sigmoid(delta + inverse_sigmoid(ref_detached))
            if self.training:
                logits.append(self.dec_score_head[i](tgt))
                boxes.append(box if prev_box is None else
                             torch.sigmoid(delta + inverse_sigmoid(prev_box)))
            elif i == self.eval_idx:
                logits.append(self.dec_score_head[i](tgt))
                boxes.append(box)
                break
            prev_box, ref_detached = box, box.detach()
        return logits, boxes


def _pairs(logits, boxes) -> list[dict]:
    return [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits, boxes)]


def generate_anchors(spatial_shapes: Sequence[tuple[int, int]], eps: float = 1e-2, device=None,
                     dtype=torch.float32, grid_size: float = 0.05):
    """Anchors per level l (h, w): centres ((x+.5)/w, (y+.5)/h), size grid_size*2^l; returned in
    logit space ``[1, S, 4]`` with +inf where any coordinate is outside (eps, 1-eps), and the
    valid mask ``[1, S, 1]`` (in ``dtype``)."""
    anchors = []
    for level, (h, w) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                                torch.arange(w, dtype=torch.float32, device=device),
                                indexing="ij")
        centres = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1).reshape(-1, 2)
        size = torch.full_like(centres, grid_size * 2.0 ** level)
        anchors.append(torch.cat([centres, size], -1))
    anchors = torch.cat(anchors)[None]
    valid = ((anchors > eps) & (anchors < 1 - eps)).all(-1, keepdim=True)
    logits = torch.log(anchors / (1 - anchors))
    logits = torch.where(valid, logits, torch.full_like(logits, float("inf")))
    return logits.to(dtype), valid.to(dtype)
