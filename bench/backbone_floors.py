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

"ghostnetv3 folded fused (automatic choice on a GPU)" counts the fused model as the automatic
backend choice runs it on a GPU, without one: fake CUDA tensors, and every ghostkernels op whose
automatic CUDA choice is the reference backend (cuDNN, for the Ghost ops: BENCHMARKS.md) counted
as the reference's PyTorch operators (``torch.cudnn_convolution_relu`` gets a shape-only kernel
here, laid out as cuDNN lays it out); ops with a kernel of their own on a GPU stay one operator.
This is the default GPU path's traffic, beside the ideal one-pass-per-op floor of the fused row.
"""
from __future__ import annotations

import argparse
import collections
import copy

import torch
import torch.nn.functional as F
from torch._library.custom_ops import OPDEFS
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.bench_backbone import Features, timm_baselines
from ghostkernels import backends
from ghostkernels.benchmark import VIEW_OPS
from rtdetr.models.backbone.ghostnetv3 import GhostNetV3

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def gpu_auto_choice(op: str, dtype: torch.dtype) -> str:
    """The backend the automatic choice takes for ``op`` on a GPU with every backend available:
    the first of its CUDA order that implements ``op`` for ``dtype``."""
    impls = backends.implementations(op)
    for backend in backends.auto_order(op, "cuda"):
        if backend in impls and dtype in impls[backend].dtypes:
            return backend
    return "reference"


# Operators that allocate without touching the memory (they move no bytes)
ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty",
                         "new_empty_strided"})


def _traffic(func, args, kwargs, out) -> int | None:
    """Bytes one call moves: every tensor argument read once and every output written once; an
    argument the op writes in place is read and written, an ``out=`` argument (keyword-only in
    every aten schema) only written. None for calls that move nothing: queries (no tensor out)
    and calls returning an argument they do not write (``x.to(x.dtype)``, which an expanded op
    reaches below the autograd layer)."""
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    arguments = func._schema.arguments
    named = {arg.name: value for arg, value in zip(arguments, args)} | kwargs
    reads, writes = {}, {}
    for arg in arguments:
        written = arg.alias_info is not None and arg.alias_info.is_write
        for t in tree_leaves(named.get(arg.name)):
            if isinstance(t, torch.Tensor):
                if not (written and arg.kwarg_only):
                    reads[id(t)] = _bytes(t)
                if written:
                    writes[id(t)] = _bytes(t)
    if not outputs or (not writes and any(id(t) in reads for t in outputs)):
        return None
    writes.update((id(t), _bytes(t)) for t in outputs)
    return sum(reads.values()) + sum(writes.values())


def op_traffic(fn, expand_reference_on_gpu: bool = False) -> list[tuple[str, int]]:
    """``(operator name, bytes read + written)`` of every operator ``fn()`` dispatches that
    returns a tensor it was not given and is not a view; run it under a FakeTensorMode to get
    shapes without computing. With ``expand_reference_on_gpu``, a ghostkernels op whose
    automatic choice on a GPU is the reference backend is recorded as that backend's operators
    (:func:`gpu_auto_choice`)."""
    records: list[tuple[str, int]] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name, ns = func.overloadpacket.__name__, func.namespace
            if (expand_reference_on_gpu and ns == "ghostkernels"
                    and gpu_auto_choice(name, args[0].dtype) == "reference"):
                with self, backends.use_backend("reference"):  # record its operators instead
                    return OPDEFS[f"{ns}::{name}"]._init_fn(*args, **kwargs)
            out = func(*args, **kwargs)
            if name in VIEW_OPS or name in ALLOCATIONS:
                return out
            moves = _traffic(func, args, kwargs, out)
            if moves is not None:
                records.append((name if ns == "aten" else f"{ns}::{name}", moves))
            return out

    with Recorder():
        fn()
    return records


_FAKE_CUDNN_LIBRARY = []


def _shape_only_cudnn_convolution_relu() -> None:
    """A Meta kernel for ``aten::cudnn_convolution_relu`` (PyTorch registers none), so that fake
    CUDA tensors can pass through :func:`ghostkernels.reference.conv.conv2d_relu`: the
    convolution's shape, channels_last when the input or the weight is (as cuDNN's
    ``cudnn_conv_suggest_memory_format``)."""
    if _FAKE_CUDNN_LIBRARY or torch._C._dispatch_has_kernel_for_dispatch_key(
            "aten::cudnn_convolution_relu", "Meta"):
        return

    def channels_last(t):
        return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)

    def meta(x, weight, bias, stride, padding, dilation, groups):
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        fmt = (torch.channels_last if channels_last(x) or channels_last(weight)
               else torch.contiguous_format)
        return y.contiguous(memory_format=fmt)

    library = torch.library.Library("aten", "IMPL")
    library.impl("cudnn_convolution_relu", meta, "Meta")
    _FAKE_CUDNN_LIBRARY.append(library)  # the registration lives as long as the library object


def model_traffic(model: torch.nn.Module, batch: int, size: int, dtype: torch.dtype,
                  channels_last: bool, on_gpu: bool = False) -> list[tuple[str, int]]:
    """op_traffic of one eval forward of ``model`` at ``batch x 3 x size x size`` (fake); with
    ``on_gpu``, on fake CUDA tensors (no GPU needed) with the ghostkernels ops as the automatic
    choice runs them there (``op_traffic``'s ``expand_reference_on_gpu``)."""
    model = copy.deepcopy(model).eval().to(dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if on_gpu:
        _shape_only_cudnn_convolution_relu()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        if on_gpu:
            model = model.to("cuda")
        x = mode.from_tensor(torch.empty(0)).new_empty((batch, 3, size, size), dtype=dtype,
                                                        device="cuda" if on_gpu else "cpu")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return op_traffic(lambda: model(x), expand_reference_on_gpu=on_gpu)


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
        if name == "ghostnetv3 folded fused":
            records = model_traffic(model, args.batch, args.size, dtype, not args.nchw,
                                    on_gpu=True)
            print(f"### {name} (automatic choice on a GPU)\n")
            print("\n".join(summary(records, args.bandwidth, args.top)) + "\n")


if __name__ == "__main__":
    main()
