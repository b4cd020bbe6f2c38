"""Backbone latency: GhostNetV3 (training branches, folded eager, folded on ghostkernels ops,
+ CUDA graph) beside timm ghostnetv3_100 (folded) and resnet18d, eval mode, channels_last.

    python -m bench.bench_backbone                    # GPU: fp16, 640x640, batch 1 and 32
    python -m bench.bench_backbone --device cpu --batch 1 --size 320 --threads 2   # CPU, fp32
    python -m bench.bench_backbone --out runs/bench   # also writes backbone.md / backbone.json

GPU times are triton.testing.do_bench medians, CPU times the median of >= 5 perf_counter runs
(ghostkernels/benchmark.py). Each model's forward returns its backbone features: GhostNetV3 the three maps
of blocks[4, 6, 9]; timm models ``forward_features`` (GhostNet: through the 960-channel 1x1 conv,
ResNet18-d: through layer4).
"""
from __future__ import annotations

import argparse
import copy
import math

import torch

from ghostkernels.benchmark import (Row, count_ops, cuda_graph_replay, machine_description,
                                    time_ms, write_outputs)
from ghostkernels import backends, tuning
from rtdetr.models.backbone.ghostnetv3 import GhostNetV3

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BASELINES = ("timm ghostnetv3_100 folded", "timm resnet18d")


def ghostnet_variants(width: float) -> dict[str, torch.nn.Module]:
    train = GhostNetV3(width).eval()
    folded = copy.deepcopy(train).reparameterize(use_fused_ops=False)
    fused = copy.deepcopy(train).reparameterize(use_fused_ops=True)
    return {"ghostnetv3 train-branches": train, "ghostnetv3 folded eager": folded,
            "ghostnetv3 folded fused": fused}


def timm_baselines() -> dict[str, torch.nn.Module]:
    """The timm baseline models, or {} when timm is missing."""
    try:
        import timm
        from timm.utils import reparameterize_model
    except ImportError:
        print("timm is not installed: baselines skipped")
        return {}
    models = {}
    for name, timm_name in zip(BASELINES, ("ghostnetv3_100", "resnet18d")):
        try:  # an older timm may lack a model: keep the others
            models[name] = reparameterize_model(
                timm.create_model(timm_name, pretrained=False).eval())
        except Exception as exc:  # noqa: BLE001
            print(f"timm {timm_name} unavailable ({type(exc).__name__}: {exc}): baseline skipped")
    return models


class Features(torch.nn.Module):
    """Wraps a timm model so that calling it returns ``forward_features``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


def timed(fn, device, failures: dict, name: str, replay: bool = False) -> float:
    """time_ms of ``fn`` (of the callable ``fn`` returns when ``replay``); a failure becomes NaN
    and a note, so one broken variant does not hide the others."""
    try:
        return time_ms(fn() if replay else fn, device)
    except Exception as exc:  # noqa: BLE001
        failures[name] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
        print(f"{name}: {failures[name]}", flush=True)
        return math.nan


def print_kernel_profile(name: str, fn, top: int) -> None:
    """Where the GPU time of ``fn`` goes: torch.profiler's CUDA kernels, most time first."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    print(f"\n#### {name}: CUDA kernels over 5 forwards, most time first\n", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top,
                                    max_name_column_width=70), flush=True)


def time_tuned(fused, x, case, device, failures, notes) -> dict[str, float]:
    """The folded fused model after ``ghostkernels.tune`` on ``x`` (plain and, on a GPU, in a
    CUDA graph); prints every choice and notes how many op call shapes went to each backend."""
    name = "ghostnetv3 folded fused [tuned]"
    timings = {}
    try:
        with tuning.tuned_for(fused, x) as choices:
            print(f"ghostkernels.tune, {case}:")
            for entry in choices:
                print("  " + entry.describe())
            with torch.inference_mode():
                timings[name] = timed(lambda: fused(x), device, failures, name)
            if device == "cuda":
                with torch.no_grad():
                    timings[name + " + CUDA graph"] = timed(
                        lambda: cuda_graph_replay(lambda: fused(x)), device, failures,
                        name + " + CUDA graph", replay=True)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        failures[name] = f"tune failed: {type(exc).__name__}: {exc}"
        return {name: float("nan")}
    for n in timings:
        notes[n] = "tuned: " + tuning.summary(choices)
    return timings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="default fp16 on cuda, fp32 on cpu")
    parser.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--compile", action="store_true",
                        help="add torch.compile of the folded eager model")
    parser.add_argument("--no-baselines", action="store_true", help="skip the timm models")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="GPU: also print the TOP most expensive CUDA kernels of the folded "
                             "eager and folded fused models per batch (torch.profiler)")
    parser.add_argument("--force-backends", nargs="*", default=[], metavar="BACKEND",
                        choices=["cuda", "triton"],
                        help="also time the folded fused model with each of these backends "
                             "preferred (every op it implements runs on it; plain and, on a GPU, "
                             "in a CUDA graph): the fused kernels inside the model, whatever the "
                             "automatic choice is")
    parser.add_argument("--tune", action="store_true",
                        help="also time the folded fused model after ghostkernels.tune (the "
                             "fastest backend per op call shape, measured here; plain and, on a "
                             "GPU, in a CUDA graph) and print the choices")
    parser.add_argument("--out", default=None, help="directory for backbone.md and backbone.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = DTYPES[args.dtype or ("fp16" if device == "cuda" else "fp32")]
    fmt = torch.contiguous_format if args.nchw else torch.channels_last

    models = ghostnet_variants(args.width)
    if args.compile:
        models["ghostnetv3 folded eager + torch.compile"] = torch.compile(
            copy.deepcopy(models["ghostnetv3 folded eager"]))
    if not args.no_baselines:
        models.update({name: Features(m) for name, m in timm_baselines().items()})
    for model in models.values():
        model.to(device=device, dtype=dtype, memory_format=fmt)

    fused_backend = backends.backend_for("ghost_conv", device, dtype)
    layout = "NCHW" if args.nchw else "channels_last"
    header = (f"## Backbone latency (eval, {layout}, GhostNetV3 width {args.width})\n\n"
              f"Machine: {machine_description(device)}")
    # Operators per forward (views excluded): the launches a GPU pays for at any batch size.
    probe = torch.rand(1, 3, 64, 64, device=device, dtype=dtype).contiguous(memory_format=fmt)
    ops = {}
    for name, model in models.items():
        try:
            ops[name] = count_ops(lambda m=model: m(probe))
        except Exception:  # noqa: BLE001 - the timing below reports a broken model
            pass
    ops["ghostnetv3 folded fused + CUDA graph"] = ops.get("ghostnetv3 folded fused")
    rows = []
    for batch in args.batch:
        case = f"{args.size}x{args.size} bs{batch} {str(dtype).replace('torch.', '')}"
        x = torch.rand(batch, 3, args.size, args.size, device=device, dtype=dtype)
        x = x.contiguous(memory_format=fmt)
        timings, failures, notes = {}, {}, {}
        with torch.inference_mode():
            for name, model in models.items():
                timings[name] = timed(lambda m=model: m(x), device, failures, name)
        if device == "cuda":
            name = "ghostnetv3 folded fused + CUDA graph"
            with torch.no_grad():  # CUDA graphs capture plain no_grad forwards
                timings[name] = timed(
                    lambda: cuda_graph_replay(lambda: models["ghostnetv3 folded fused"](x)),
                    device, failures, name, replay=True)
        for forced in args.force_backends:
            fused = models["ghostnetv3 folded fused"]
            name = f"ghostnetv3 folded fused [{forced}]"

            def forward_forced(forced=forced):
                with backends.prefer_backend(forced):
                    return fused(x)

            with torch.inference_mode():
                timings[name] = timed(forward_forced, device, failures, name)
            if device == "cuda":
                with torch.no_grad():
                    timings[name + " + CUDA graph"] = timed(
                        lambda fn=forward_forced: cuda_graph_replay(fn), device, failures,
                        name + " + CUDA graph", replay=True)
        if args.tune:
            timings.update(time_tuned(models["ghostnetv3 folded fused"], x, case, device,
                                      failures, notes))
        if device == "cuda" and args.profile:
            with torch.inference_mode():
                for name in ("ghostnetv3 folded eager", "ghostnetv3 folded fused"):
                    print_kernel_profile(f"{name}, {case}", lambda m=models[name]: m(x),
                                         args.profile)
        for name, ms in timings.items():
            ratios = {b: timings[b] / ms for b in BASELINES
                      if b in timings and b != name and not math.isnan(ms)}
            note = failures.get(name) or notes.get(name) or "; ".join(
                part for part in (f"{ops[name]} ops" if ops.get(name) else "",
                                  f"ghostkernels backend: {fused_backend}"
                                  if "fused" in name and "[" not in name else "") if part)
            rows.append(Row("backbone", case, name, ms, ratios=ratios, note=note))
        write_outputs(rows, header, args.out, "backbone", echo=False)
    write_outputs(rows, header, args.out, "backbone")


if __name__ == "__main__":
    main()
