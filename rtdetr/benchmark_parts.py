"""Where a detector's time goes: the folded model timed as growing prefixes of its forward, and
what that means for a "model A at least k times faster than model B" comparison (issue 7).

The prefixes (``PARTS``): the backbone alone; backbone + hybrid encoder; the whole model (+ the
decoder); model + postprocessor (what the plain benchmark rows time). Each is timed like the
mode's full row (eager, CUDA graph, tuned, ...), so consecutive differences are the encoder's,
the decoder's and the postprocessor's share.

Model A is ``factor`` times faster than model B when ``T_A <= T_B / factor``. With A's time
outside its backbone ``E_A = T_A - backbone_A`` held fixed, that needs
``backbone_A <= T_B / factor - E_A``: :func:`backbone_budget` writes this bound into the note of
A's backbone row (it is negative when no backbone could reach the factor).

    rtdetr bench --breakdown --models ghost100 r18 --modes "folded + fused + CUDA graph"
"""
from __future__ import annotations

import math

import torch
from torch import nn

FULL = "model + postprocessor"
PARTS = ("backbone", "backbone + encoder", "model", FULL)


class DetectorPrefix(nn.Module):
    """The first stages of an RT-DETR's forward (``part``: one of ``PARTS[:3]``) as a module:
    ``images -> backbone features | encoder memory | the model's output dict``."""

    def __init__(self, model: nn.Module, part: str):
        super().__init__()
        if part not in PARTS[:3]:
            raise ValueError(f"part must be one of {PARTS[:3]}, got {part!r}")
        for name in ("backbone", "encoder", "decoder"):
            if not isinstance(getattr(model, name, None), nn.Module):
                raise TypeError(f"model must have a {name} module (an RT-DETR), got "
                                f"{type(model).__name__} without one")
        self.model, self.part = model, part
        self.train(model.training)

    def forward(self, images: torch.Tensor):
        features = self.model.backbone(images)
        if self.part == "backbone":
            return features
        memory = self.model.encoder(features)
        if self.part == "backbone + encoder":
            return memory
        return self.model.decoder(memory)


def part_label(mode: str, part: str) -> str:
    """The implementation column of a row: the mode alone for the full detector."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    return mode if part == FULL else f"{mode} [{part}]"


def backbone_budget(rows, reference: str, factor: float = 1.5) -> None:
    """For every row of a model's backbone (``part_label(mode, "backbone")``) whose model also has
    a full row in the same case and mode, and where the ``reference`` model has a full row there
    too, append to the row's note the backbone time at which the model would be ``factor`` times
    faster than the reference: ``T_ref / factor - (T_model - backbone_model)``."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ValueError(f"factor must be a number > 0, got {factor!r}")
    full = {(r.group, r.case, r.implementation): r.ms for r in rows}
    for row in rows:
        suffix = f" [{PARTS[0]}]"
        if row.group == reference or not row.implementation.endswith(suffix):
            continue
        mode = row.implementation[:-len(suffix)]
        total = full.get((row.group, row.case, mode))
        ref = full.get((reference, row.case, mode))
        if total is None or ref is None or any(math.isnan(v) for v in (total, ref, row.ms)):
            continue
        budget = ref / factor - (total - row.ms)
        row.note = "; ".join(filter(None, [
            row.note, f"{factor:g}x faster than {reference} ({ref:.3f} ms) needs this backbone "
            f"<= {budget:.3f} ms (rest of the model {total - row.ms:.3f} ms)"]))
