"""RT-DETR post-processing (spec §6): model outputs -> detections in original-image pixels.

``scores = sigmoid(pred_logits)`` [B,Q,K] is flattened to [B,Q*K] and the top ``num_top_queries``
entries are kept: ``label = index mod K``, ``query = index div K`` (a query may appear with several
classes). Boxes are converted cxcywh -> xyxy and scaled by ``orig_target_sizes`` given as
**(w, h)** per image. No NMS, no score threshold.

Normal mode returns a list of dicts ``{"labels", "boxes", "scores"}`` per image, labels optionally
remapped to dataset category ids (``label_to_category``). ``deploy()`` switches to returning the
tensors ``(labels [B,k] int64, boxes [B,k,4], scores [B,k])`` with contiguous labels, as the
official ONNX export does; every op used there exports to ONNX.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from rtdetr.models.box_ops import box_cxcywh_to_xyxy


def _category_table(label_to_category, num_classes: int) -> torch.Tensor | None:
    if label_to_category is None:
        return None
    if isinstance(label_to_category, Mapping):
        missing = [k for k in range(num_classes) if k not in label_to_category]
        if missing:
            raise ValueError(f"label_to_category must map every label 0..{num_classes - 1}, "
                             f"got no entry for {missing[:5]}")
        ids = [int(label_to_category[k]) for k in range(num_classes)]
    elif isinstance(label_to_category, Sequence):
        if len(label_to_category) != num_classes:
            raise ValueError(f"label_to_category must list {num_classes} category ids "
                             f"(one per label), got {len(label_to_category)}")
        ids = [int(c) for c in label_to_category]
    else:
        raise TypeError(f"label_to_category must be a mapping label -> category id or a "
                        f"sequence of ids, got {type(label_to_category).__name__}")
    return torch.tensor(ids, dtype=torch.int64)


def _eager() -> bool:
    return not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or torch.compiler.is_compiling())


class RTDETRPostProcessor(nn.Module):
    def __init__(self, num_classes: int = 80, num_top_queries: int = 300,
                 label_to_category: Mapping[int, int] | Sequence[int] | None = None):
        super().__init__()
        if num_classes < 1 or num_top_queries < 1:
            raise ValueError(f"num_classes and num_top_queries must be >= 1, got "
                             f"{num_classes} and {num_top_queries}")
        self.num_classes = num_classes
        self.num_top_queries = num_top_queries
        table = _category_table(label_to_category, num_classes)
        self.register_buffer("category_ids", table, persistent=False)
        self.deploy_mode = False

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_top_queries={self.num_top_queries}, "
                f"remap={self.category_ids is not None}, deploy_mode={self.deploy_mode}")

    def deploy(self) -> "RTDETRPostProcessor":
        """Return tensors (labels, boxes, scores) instead of a list of dicts (for export)."""
        self.eval()
        self.deploy_mode = True
        return self

    def _check(self, logits, boxes, orig_target_sizes) -> None:
        if logits.dim() != 3 or logits.shape[-1] != self.num_classes:
            raise ValueError(f"pred_logits must have shape [B, Q, {self.num_classes}], "
                             f"got {tuple(logits.shape)}")
        if boxes.shape != (*logits.shape[:2], 4):
            raise ValueError(f"pred_boxes must have shape {[*logits.shape[:2], 4]} "
                             f"(cxcywh), got {tuple(boxes.shape)}")
        if orig_target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(f"orig_target_sizes must have shape [{logits.shape[0]}, 2] "
                             f"as (w, h) per image, got {tuple(orig_target_sizes.shape)}")
        if orig_target_sizes.device != boxes.device:
            raise ValueError(f"orig_target_sizes must be on the outputs' device "
                             f"({boxes.device}), got {orig_target_sizes.device}")

    @torch.no_grad()
    def forward(self, outputs: dict, orig_target_sizes: torch.Tensor):
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        eager = _eager()
        if eager:
            self._check(logits, boxes, orig_target_sizes)
        if boxes.dtype in (torch.float16, torch.bfloat16):
            # pixels in float32: half precision steps 1-4 px above 1024-4096 px (bf16: 8x more)
            boxes = boxes.float()
        scale = orig_target_sizes.to(boxes.dtype).repeat(1, 2).unsqueeze(1)  # (w, h, w, h)
        boxes = box_cxcywh_to_xyxy(boxes) * scale
        num_classes = logits.shape[-1]
        # Fewer than num_top_queries scores: keep them all. Q and K are fixed by the model, so
        # the clamp is also right in a traced/exported graph (whose batch alone is dynamic).
        k = min(self.num_top_queries, logits.shape[1] * num_classes)
        scores, index = logits.sigmoid().flatten(1).topk(k, dim=-1)
        query = torch.div(index, num_classes, rounding_mode="floor")
        labels = index - query * num_classes  # mod, written TensorRT-friendly
        boxes = boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
        if self.deploy_mode:
            return labels, boxes, scores
        if self.category_ids is not None:
            labels = self.category_ids.to(labels.device)[labels]
        return [{"labels": lab, "boxes": box, "scores": sco}
                for lab, box, sco in zip(labels, boxes, scores)]
