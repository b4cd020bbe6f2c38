"""Validation of detection targets, run by the model before any kernel sees them.

A target batch is a list (or tuple) with one dict per image holding exactly

- ``labels``: int64 tensor ``[n]``, every value in ``[0, num_classes)`` (contiguous class ids:
  COCO category ids must be remapped at the dataset boundary);
- ``boxes``: floating tensor ``[n, 4]``, normalised ``cxcywh``, finite, with ``w > 0``, ``h > 0``
  and the box inside the image: every value in [0, 1] and the corners ``cx -/+ w/2``,
  ``cy -/+ h/2`` in [0, 1] up to ``CORNER_TOLERANCE`` (float rounding of clamped boxes).

Without this check a bad label or box surfaces later as a CUDA device assert in the matcher or
the denoising embedding (RT-DETR issues #70, #99). Errors are ValueError/TypeError naming the
image index, the key, what was expected and what came. Value checks read tensor contents on the
host, so they are skipped while torch.compile/export traces.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from ghostkernels.checks import tracing

REQUIRED_KEYS = ("labels", "boxes")
CORNER_TOLERANCE = 1e-4


def _where(image: int, key: str | None = None) -> str:
    return f"targets[{image}]" + (f"[{key!r}]" if key is not None else "")


def _first_bad_row(bad: torch.Tensor) -> int:
    return int(bad.nonzero()[0, 0])


def _check_keys(image: int, target, extra_keys: frozenset) -> None:
    if not isinstance(target, dict):
        raise TypeError(f"{_where(image)} must be a dict with keys {list(REQUIRED_KEYS)}, "
                        f"got {type(target).__name__}")
    for key in REQUIRED_KEYS:
        if key not in target:
            raise ValueError(f"{_where(image)} is missing the key {key!r} "
                             f"(expected keys {list(REQUIRED_KEYS)}, got {list(target)})")
    unknown = [k for k in target if k not in REQUIRED_KEYS and k not in extra_keys]
    if unknown:
        raise ValueError(f"{_where(image)} has unknown key {unknown[0]!r} "
                         f"(expected exactly {list(REQUIRED_KEYS)}"
                         + (f" plus optional {sorted(extra_keys)}" if extra_keys else "")
                         + f", got {list(target)})")
    for key in REQUIRED_KEYS:
        if not isinstance(target[key], torch.Tensor):
            raise TypeError(f"{_where(image, key)} must be a torch.Tensor, "
                            f"got {type(target[key]).__name__}")


def _check_labels(image: int, labels: torch.Tensor, num_classes: int) -> None:
    where = _where(image, "labels")
    if labels.dtype != torch.int64:
        raise TypeError(f"{where} must have dtype int64, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{where} must be a 1-d tensor [n], got shape {tuple(labels.shape)}")
    if labels.numel() == 0 or tracing():
        return
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        row = _first_bad_row(bad)
        raise ValueError(f"{where} must lie in [0, {num_classes}) (num_classes={num_classes}; "
                         f"remap dataset category ids to contiguous labels), got "
                         f"{int(labels[row])} at position {row}")


def _check_boxes(image: int, boxes: torch.Tensor, num_labels: int) -> None:
    where = _where(image, "boxes")
    if not boxes.is_floating_point():
        raise TypeError(f"{where} must be a floating-point tensor, got {boxes.dtype}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where} must have shape [n, 4] (normalised cxcywh), "
                         f"got {tuple(boxes.shape)}")
    if boxes.shape[0] != num_labels:
        raise ValueError(f"{where} must have one row per label ({num_labels} labels), "
                         f"got {boxes.shape[0]} boxes")
    if boxes.numel() == 0 or tracing():
        return
    checks = (
        (~torch.isfinite(boxes).all(dim=1), "finite values"),
        ((boxes[:, 2] <= 0) | (boxes[:, 3] <= 0), "width > 0 and height > 0"),
        (((boxes < 0) | (boxes > 1)).any(dim=1), "normalised values in [0, 1]"),
    )
    for bad, expected in checks:
        if bad.any():
            row = _first_bad_row(bad)
            raise ValueError(f"{where} must be normalised cxcywh with {expected}, got "
                             f"{boxes[row].tolist()} at row {row}")
    half = boxes[:, 2:] * 0.5
    corners = torch.cat((boxes[:, :2] - half, boxes[:, :2] + half), dim=1)
    bad = ((corners < -CORNER_TOLERANCE) | (corners > 1 + CORNER_TOLERANCE)).any(dim=1)
    if bad.any():
        row = _first_bad_row(bad)
        raise ValueError(f"{where} must lie inside the image (corners in [0, 1]), got cxcywh "
                         f"{boxes[row].tolist()} = xyxy {corners[row].tolist()} at row {row}")


def validate_targets(targets, num_classes: int, batch_size: int | None = None,
                     extra_keys: Iterable[str] = ()) -> None:
    """Raise ValueError/TypeError unless ``targets`` is a valid detection target batch.

    ``batch_size``, when given, is the number of images the targets must describe.
    ``extra_keys`` names optional metadata keys (e.g. ``image_id``) a caller chooses to allow;
    by default only ``labels`` and ``boxes`` are accepted.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets must be a list of dicts (one per image), "
                        f"got {type(targets).__name__}")
    if batch_size is not None and len(targets) != batch_size:
        raise ValueError(f"targets must hold one dict per image ({batch_size} images), "
                         f"got {len(targets)}")
    extra = frozenset(extra_keys)
    for image, target in enumerate(targets):
        _check_keys(image, target, extra)
        if target["labels"].device != target["boxes"].device:
            raise ValueError(f"{_where(image, 'labels')} must be on the device of "
                             f"{_where(image, 'boxes')} ({target['boxes'].device}), "
                             f"got {target['labels'].device}")
        _check_labels(image, target["labels"], num_classes)
        _check_boxes(image, target["boxes"], target["labels"].shape[0])
