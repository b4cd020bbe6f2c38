"""Batch collation with optional multi-scale training (RT-DETRv2 ``BatchImageCollateFunction``).

Images of one batch (already resized to one square size by the transforms) are stacked; with
``scales`` the whole batch is resized (nearest) to a random square size drawn from ``scales`` until
``stop_epoch``. Boxes are normalised, so they do not change. The size is a pure function of
``(seed, epoch, image ids of the batch)``, so it does not depend on the worker or on resumption.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch
import torch.nn.functional as F


class BatchCollator:
    def __init__(self, scales: Sequence[int] | None = None, stop_epoch: int | None = None,
                 seed: int = 0):
        if scales is not None:
            scales = [int(s) for s in scales]
            if not scales or any(s <= 0 for s in scales):
                raise ValueError(f"scales must be a non-empty list of positive ints, got {scales}")
        self.scales, self.stop_epoch, self.seed = scales, stop_epoch, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def pick_size(self, image_ids: Sequence[int]) -> int | None:
        if not self.scales or (self.stop_epoch is not None and self.epoch >= self.stop_epoch):
            return None
        rng = random.Random(hash((self.seed, self.epoch, tuple(int(i) for i in image_ids))))
        return rng.choice(self.scales)

    def __call__(self, batch):
        images = [b[0] for b in batch]
        targets = [b[1] for b in batch]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"all images of a batch must have one shape (resize them in the "
                             f"transforms), got {sorted(shapes)}")
        images = torch.stack(images)
        size = self.pick_size([t.get("image_id", i) for i, t in enumerate(targets)])
        if size is not None and size != images.shape[-1]:
            images = F.interpolate(images, size=(size, size), mode="nearest")
        return images, targets
