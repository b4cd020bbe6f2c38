"""Memory floors of the backbones, op by op, without running them: where the bytes go.

Each model's forward runs on fake tensors (shapes only, so batch 32 at 640x640 costs nothing on
a CPU); a dispatch mode records every operator (views excluded) with the bytes it must move at
least: each tensor argument read once, each output written once. The floor of an op is its bytes
over the memory bandwidth; a GPU profile (``bench.bench_backbone --profile``) gives the measured
time per kernel, and the ratio says which kernels are far from their floor. The sum is the
backbone's floor: what a perfectly fused-per-op implementation could reach at that bandwidth.

    python -m bench.backbone_floors                       # B32 640x640 fp16 channels_last
    python -m bench.backbone_floors --batch 1 --top 20 --bandwidth 3.35

Counted per op, so the floors of the unfused models include every intermediate round trip (cat,
separate bias/activation passes, upsampled gates): comparing the folded-eager and folded-fused
totals shows what the fusions save. Weights are counted once per op that reads them.
"""
from __future__ import annotations

import argparse
import collections
import copy

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.bench_backbone import Features, timm_baselines
from ghostkernels.benchmark import VIEW_OPS
from rtdetr.models.backbone.ghostnetv3 import GhostNetV3

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def op_traffic(fn) -> list[tuple[str, int]]:
    """``(operator name, bytes read + written)`` of every operator ``fn()`` dispatches that
    returns a tensor and is not a view; run it under a FakeTensorMode to get shapes without
    computing."""
    records: list[tuple[str, int]] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            moves_data = any(isinstance(t, torch.Tensor) for t in tree_leaves(out))
            if name not in VIEW_OPS and moves_data:  # not views, nor queries like prim::device
                seen, total = set(), 0
                for t in tree_leaves((args, kwargs or {})) + tree_leaves(out):
                    if isinstance(t, torch.Tensor) and id(t) not in seen:
                        seen.add(id(t))
                        total += _bytes(t)
                ns = func.namespace
                records.append((name if ns == "aten" else f"{ns}::{name}", total))
            return out

    with Recorder():
        fn()
    return records


def model_traffic(model: torch.nn.Module, batch: int, size: int, dtype: torch.dtype,
                  channels_last: bool) -> list[tuple[str, int]]:
    """op_traffic of one eval forward of ``model`` at ``batch x 3 x size x size`` (fake)."""
    model = copy.deepcopy(model).eval().to(dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        x = mode.from_tensor(torch.empty(0)).new_empty((batch, 3, size, size), dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return op_traffic(lambda: model(x))


def backbones(width: float) -> dict[str, torch.nn.Module]:
    """GhostNetV3 folded eager and folded fused, and the timm baselines of bench_backbone."""
    train = GhostNetV3(width=width).eval()
    models = {"ghostnetv3 folded eager": copy.deepcopy(train).reparameterize(use_fused_ops=False),
              "ghostnetv3 folded fused": copy.deepcopy(train).reparameterize(use_fused_ops=True)}
    models.update({name: Features(m) for name, m in timm_baselines().items()})
    return models


def summary(records, bandwidth_tbs: float, top: int) -> list[str]:
    """Markdown lines: the total, then the ``top`` op kinds by bytes."""
    total = sum(b for _, b in records)
    by_kind: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for name, b in records:
        by_kind[name][0] += 1
        by_kind[name][1] += b
    us = lambda b: b / (bandwidth_tbs * 1e12) * 1e6  # noqa: E731
    lines = [f"{len(records)} ops, {total / 1e6:.1f} MB, floor {us(total) / 1e3:.3f} ms", "",
             "| op | count | MB | floor us | share |", "|---|---|---|---|---|"]
    for name, (count, b) in sorted(by_kind.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| {name} | {count} | {b / 1e6:.1f} | {us(b):.1f} | {b / total:.1%} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    parser.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--bandwidth", type=float, default=4.24,
                        help="memory bandwidth in TB/s (default: the copy bandwidth measured on "
                             "the H200 of BENCHMARKS.md; H100 SXM ~3.35 spec)")
    parser.add_argument("--top", type=int, default=12, help="op kinds listed per model")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    print(f"## Memory floors per op: {args.batch}x3x{args.size}x{args.size} {args.dtype} "
          f"{'NCHW' if args.nchw else 'channels_last'}, {args.bandwidth} TB/s\n")
    for name, model in backbones(args.width).items():
        records = model_traffic(model, args.batch, args.size, dtype, not args.nchw)
        print(f"### {name}\n")
        print("\n".join(summary(records, args.bandwidth, args.top)) + "\n")


if __name__ == "__main__":
    main()
