"""Per-size constants of a forward (anchors, level tables, position embeddings), built once."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def cached(cache: dict, key, build: Callable[[], T], limit: int) -> T:
    """``cache[key]``, built with ``build()`` on first use. The cache holds at most ``limit``
    entries (a model meets a few input sizes, devices and dtypes): when full it is cleared, so
    it never grows without bound. Tensors built once per size also keep a forward free of
    host-to-device copies (CUDA-graph capturable). ``build()`` runs outside inference mode:
    a constant first built under ``torch.inference_mode()`` would otherwise be an inference
    tensor, unusable by a later training forward (it cannot be saved for backward)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an int >= 1, got {limit!r}")
    if key not in cache:
        if len(cache) >= limit:
            cache.clear()
        with torch.inference_mode(False):
            cache[key] = build()
    return cache[key]
