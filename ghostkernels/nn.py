"""Drop-in modules built on the ghostkernels ops."""
from __future__ import annotations

import math

import torch
from torch import nn

from ghostkernels.checks import require_tensor
from ghostkernels.ops.ms_deform_attn import ms_deform_attn_softmax


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable-DETR's ``MSDeformAttn``).

    Parameters and state_dict keys (``sampling_offsets``, ``attention_weights``, ``value_proj``,
    ``output_proj``) and the initialisation match Deformable-DETR's module, so its checkpoints (and
    RT-DETR's ``MSDeformableAttention``) load unchanged.

    Reference points may be 2-d ``(x, y)``: offsets are in pixels of each level, or 4-d
    ``(cx, cy, w, h)`` boxes: offsets are scaled by ``offset_scale * box_size / n_points``
    (RT-DETR and Deformable-DETR two-stage; ``offset_scale=0.5``).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4, offset_scale: float = 0.5):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got d_model={d_model}, "
                             f"n_heads={n_heads}")
        for name, v in (("n_levels", n_levels), ("n_heads", n_heads), ("n_points", n_points)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.offset_scale = offset_scale
        self.im2col_step = 64  # kept for drop-in compatibility; the kernels need no chunking
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def sampling_locations(self, query: torch.Tensor, reference_points: torch.Tensor,
                           spatial_shapes: torch.Tensor) -> torch.Tensor:
        N, Lq, _ = query.shape
        offsets = self.sampling_offsets(query).view(N, Lq, self.n_heads, self.n_levels,
                                                    self.n_points, 2)
        if reference_points.dim() != 4 or reference_points.shape[:2] != (N, Lq) or \
                reference_points.shape[2] not in (1, self.n_levels) or \
                reference_points.shape[3] not in (2, 4):
            raise ValueError(
                "reference_points must have shape [N, Lq, n_levels or 1, 2 or 4] = "
                f"[{N}, {Lq}, {self.n_levels} or 1, 2 or 4], got {tuple(reference_points.shape)}")
        ref = reference_points[:, :, None, :, None, :]
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            # The level table may stay on the CPU (as ms_deform_attn allows) for inputs elsewhere.
            normalizer = normalizer.to(offsets.device, offsets.dtype, non_blocking=True)
            return ref + offsets / normalizer[None, None, None, :, None, :]
        scale = self.offset_scale / self.n_points
        return ref[..., :2] + offsets * scale * ref[..., 2:]

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor,
                input_flatten: torch.Tensor, input_spatial_shapes: torch.Tensor,
                input_level_start_index: torch.Tensor,
                input_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query [N, Lq, C], reference_points [N, Lq, L|1, 2|4], input_flatten [N, S, C],
        input_spatial_shapes [L, 2], input_level_start_index [L], input_padding_mask [N, S]
        (True = padding) -> [N, Lq, C]."""
        for name, t in (("query", query), ("reference_points", reference_points),
                        ("input_flatten", input_flatten),
                        ("input_spatial_shapes", input_spatial_shapes),
                        ("input_level_start_index", input_level_start_index)):
            require_tensor(name, t)
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f"query must have shape [N, Lq, {self.d_model}], "
                             f"got {tuple(query.shape)}")
        if input_flatten.dim() != 3 or input_flatten.shape[0] != query.shape[0] or \
                input_flatten.shape[-1] != self.d_model:
            raise ValueError(f"input_flatten must have shape [{query.shape[0]}, S, {self.d_model}], "
                             f"got {tuple(input_flatten.shape)}")
        if input_spatial_shapes.shape != (self.n_levels, 2):
            raise ValueError(f"input_spatial_shapes must have shape [{self.n_levels}, 2], "
                             f"got {tuple(input_spatial_shapes.shape)}")
        N, Lq, _ = query.shape
        S = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            require_tensor("input_padding_mask", input_padding_mask)
            if input_padding_mask.shape != (N, S):
                raise ValueError(f"input_padding_mask must have shape [{N}, {S}], "
                                 f"got {tuple(input_padding_mask.shape)}")
            value = value.masked_fill(input_padding_mask[..., None].bool(), 0.0)
        value = value.view(N, S, self.n_heads, self.d_model // self.n_heads)
        # Unnormalised: the kernel applies the softmax over the n_levels * n_points points.
        logits = self.attention_weights(query).view(N, Lq, self.n_heads, self.n_levels,
                                                    self.n_points)
        locations = self.sampling_locations(query, reference_points, input_spatial_shapes)
        if locations.dtype != value.dtype and locations.dtype != torch.float32:
            locations = locations.to(value.dtype)
        out = ms_deform_attn_softmax(value, input_spatial_shapes, input_level_start_index,
                                     locations, logits.to(value.dtype))
        return self.output_proj(out)
