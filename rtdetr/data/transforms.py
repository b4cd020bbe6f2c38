"""Box-aware transforms on ``torchvision.transforms.v2`` tv_tensors (the RT-DETR recipe, spec §5).

Train: photometric distort (p 0.5) -> zoom-out (p 0.5) -> IoU crop (p 0.8) -> sanitize -> flip
(p 0.5) -> resize to ``size x size`` (aspect not kept) -> float in [0, 1] -> sanitize -> boxes as
normalised cxcywh. Val: resize -> float -> normalised cxcywh. From ``stop_epoch`` on, the three
strong ops (distort, zoom-out, IoU crop) are skipped (the v2 policy).

Randomness is a pure function of ``(seed, epoch, sample index)``: every call with an index runs
under a forked torch RNG seeded from those three numbers, so a sample's augmentation does not depend
on the order, the worker that loads it, or on whether the run was resumed from a checkpoint. A call
without an index draws from the global torch generator.
"""
from __future__ import annotations

import contextlib
import operator

import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample in one epoch. Integer-like arguments (NumPy ints,
    e.g. from ``Subset(dataset, np.arange(n))``, 0-d int tensors) count as their int values."""
    seed, epoch, index = (operator.index(v) for v in (seed, epoch, index))
    h = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB)
    h &= (1 << 64) - 1
    h ^= h >> 31
    return h & ((1 << 63) - 1)


def to_model_target(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """uint8/float image + pixel boxes (XYXY, or ``tv_tensors.BoundingBoxes`` in any format) ->
    float image in [0, 1] + normalised cxcywh boxes."""
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    h, w = image.shape[-2:]
    boxes = target["boxes"]
    if isinstance(boxes, tv_tensors.BoundingBoxes):  # v2 transforms keep the caller's format
        boxes = v2.functional.convert_bounding_box_format(
            boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY)
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    boxes = box_convert(boxes, "xyxy", "cxcywh") / torch.tensor([w, h, w, h], dtype=torch.float32)
    out = dict(target)
    out["boxes"] = boxes.as_subclass(torch.Tensor)
    return image.as_subclass(torch.Tensor), out


class DetectionTransforms:
    """Callable ``(image, target, index) -> (image, target)`` used by :class:`CocoDetection`."""

    def __init__(self, size: int, train: bool, seed: int = 0, stop_epoch: int | None = None,
                 photometric: bool = True, zoom_out: bool = True, iou_crop: bool = True,
                 flip: bool = True, zoom_out_max: float = 4.0):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size, self.train, self.seed, self.stop_epoch = size, train, seed, stop_epoch
        self.epoch = 0
        strong = []
        if train and photometric:
            strong.append(v2.RandomPhotometricDistort(p=0.5))
        if train and zoom_out:
            strong.append(v2.RandomZoomOut(fill=0, side_range=(1.0, zoom_out_max), p=0.5))
        if train and iou_crop:
            strong.append(v2.RandomApply([v2.RandomIoUCrop()], p=0.8))
        self.strong = v2.Compose(strong) if strong else None
        basic = [v2.SanitizeBoundingBoxes(min_size=1)] if train else []
        if train and flip:
            basic.append(v2.RandomHorizontalFlip(p=0.5))
        basic += [v2.Resize((size, size)), v2.ToDtype(torch.float32, scale=True),
                  v2.SanitizeBoundingBoxes(min_size=1)]
        self.basic = v2.Compose(basic)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def strong_enabled(self) -> bool:
        return self.strong is not None and (self.stop_epoch is None or self.epoch < self.stop_epoch)

    def __call__(self, image, target: dict, index: int | None = None):
        # Only the CPU generator is forked and seeded (the transforms draw from it alone).
        # torch.manual_seed would also reseed every accelerator's generator, outside the fork,
        # and where CUDA is not initialised it queues a lazy seed call with a formatted stack
        # per device type: 0.1-0.5 ms a sample, ~3 ms of each batch the demo loads in its
        # training process.
        # Without an index the draws come from (and advance) the global generator: a fork would
        # restore it after the call and give every call the same augmentation.
        fork = torch.random.fork_rng(devices=[]) if index is not None else contextlib.nullcontext()
        with fork:
            if index is not None:
                torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            if self.strong_enabled():
                image, target = self.strong(image, target)
            image, target = self.basic(image, target)
        return to_model_target(image, target)


def horizontal_flip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Deterministic flip of a tv_tensors sample (used in tests and for test-time checks)."""
    return v2.functional.horizontal_flip(image), {
        **target, "boxes": v2.functional.horizontal_flip(target["boxes"])}


__all__ = ["DetectionTransforms", "horizontal_flip", "sample_seed", "to_model_target",
           "tv_tensors"]
