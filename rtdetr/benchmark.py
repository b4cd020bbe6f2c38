"""End-to-end detector latency (model + postprocessor, random weights) at 640x640, one table.

Per model and batch: unfolded eager (training structure), folded eager, folded + fused ops,
folded + fused + CUDA graph (GPU only), folded + fused + tuned (+ CUDA graph, GPU only: after
``ghostkernels.tune``, every op call shape on the backend measured fastest on this machine),
torch.compile (inductor, folded + fused). "Eager" rows run every ghostkernels op on its
``reference`` backend (plain PyTorch); "fused" rows on the automatic choice (named in the note).
Weights and inputs channels_last; GPU: fp16, batch 1 and 32; CPU: fp32, batch 1
(benchmark-protocol.md).

    rtdetr bench                          # GPU if present, else CPU
    rtdetr bench --device cpu --quick --out results/
    rtdetr bench --models r18 --modes "folded + fused" --batch 1
    rtdetr bench --breakdown --models ghost100 r18    # + backbone / encoder / decoder prefixes

``--breakdown`` adds rows for the prefixes of the forward (rtdetr.benchmark_parts) and, with
R18 in the run, the backbone time each other model needs to be ISSUE7_FACTOR times faster.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time

import torch

from ghostkernels.benchmark import Row, machine_description, time_ms, write_outputs
from ghostkernels import backend_for, tuning, use_backend
from rtdetr.benchmark_parts import FULL, PARTS, DetectorPrefix, backbone_budget, part_label

MODELS = {"r18": ("RT-DETR-R18", "rtdetr_r18vd"),
          "ghost100": ("RT-DETR-GhostNetV3-1.0", "rtdetr_ghostnetv3_100"),
          "ghost130": ("RT-DETR-GhostNetV3-1.3", "rtdetr_ghostnetv3_130")}
MODES = ("unfolded eager", "folded eager", "folded + fused", "folded + fused + CUDA graph",
         "folded + fused + tuned", "folded + fused + tuned + CUDA graph", "torch.compile")
BASELINE = "unfolded eager"
OPS = ("ms_deform_attn", "ghost_conv", "depthwise_conv", "dfc_gate", "se_excitation")
# Official RT-DETRv2-R18 after deploy(), model forward at 640x640, batch 1, on the 2-core
# development CPU (shared/spec/anchors.md); measured separately, so only quoted in the header.
OFFICIAL_R18_CPU_MS = 500.0
# Issue 7: RT-DETR-GhostNetV3 folded + fused + graph at least this many times faster than R18.
ISSUE7_FACTOR = 1.5


def build(config: str):
    from rtdetr.config import load_config
    from rtdetr.models.config import build_model
    model, _, postprocessor = build_model(load_config(config).model)
    return model.eval(), postprocessor


@contextlib.contextmanager
def backbone_ops(model, fused: bool):
    """A folded GhostNetV3 backbone runs on the fused ops (True) or on F.conv2d & co. (False)
    inside, whatever its default ("auto": fused on GPUs only)."""
    backbone = model.backbone
    switch = hasattr(type(backbone), "use_fused_ops") and backbone.deployed
    before = backbone.use_fused_ops if switch else None
    if switch:
        backbone.use_fused_ops = fused
    try:
        yield
    finally:
        if switch:
            backbone.use_fused_ops = before


def backends_note(device: str, dtype: torch.dtype, backbone_fused: bool) -> str:
    ops = OPS if backbone_fused else OPS[:1]
    return ", ".join(f"{op}={backend_for(op, device, dtype)}" for op in ops)


def _target(model, postprocessor, part):
    """(module, postprocessor or None) timed for ``part`` of the detector: the model with its
    postprocessor, or a prefix of its forward alone."""
    if part == FULL:
        return model, postprocessor
    return DetectorPrefix(model, part), None


def run_mode(mode, model, postprocessor, images, sizes, device, cpu_runs, compile_backend,
             parts=(FULL,)) -> list[tuple[str, float, str]]:
    """[(part, milliseconds, note)] of one mode for each of ``parts`` (benchmark_parts.PARTS;
    a part that fails gets NaN and the error in its note); the model is already folded for every
    mode but the first. A tuned mode tunes once, on the whole detector, for all parts."""
    from rtdetr.runtime import EndToEndDetector
    dtype = images.dtype
    fused = hasattr(type(model.backbone), "use_fused_ops") and model.backbone.deployed
    eager = mode in ("unfolded eager", "folded eager")
    note = "reference ops" if eager else backends_note(device, dtype, fused)
    with contextlib.ExitStack() as stack:
        stack.enter_context(backbone_ops(model, fused=not eager))
        if eager:
            stack.enter_context(use_backend("reference"))
        if " + tuned" in mode:
            entries = stack.enter_context(tuning.tuned_for(
                EndToEndDetector(model, postprocessor), images, sizes))
            mode, note = mode.replace(" + tuned", ""), "tuned: " + tuning.summary(entries)
        results = []
        for part in parts:
            try:
                ms, extra = _time_part(mode, model, postprocessor, images, sizes, device,
                                       cpu_runs, compile_backend, part)
                results.append((part, ms, note + extra))
            except Exception as exc:  # noqa: BLE001 - a failing part must not hide the rest
                results.append((part, math.nan,
                                f"failed: {type(exc).__name__}: {str(exc)[:160]}"))
        return results


def _time_part(mode, model, postprocessor, images, sizes, device, cpu_runs, compile_backend,
               part) -> tuple[float, str]:
    """(milliseconds, note suffix) of ``part`` in ``mode`` (tuning and backends already set)."""
    from rtdetr.runtime import CudaGraphDetector, EndToEndDetector, compile_detector
    module, post = _target(model, postprocessor, part)
    inputs = (images,) if post is None else (images, sizes)
    if mode == "folded + fused + CUDA graph":
        graphed = CudaGraphDetector(module, images.shape[0], images.shape[2], images.shape[3],
                                    images.dtype, postprocessor=post,
                                    channels_last=not images.is_contiguous())
        graphed(*inputs)  # copies the inputs into the static buffers
        return time_ms(graphed.replay, device, cpu_runs), ""
    if mode == "torch.compile":
        call = compile_detector(module, post, backend=compile_backend)
    else:
        call = module if post is None else EndToEndDetector(module, post)
    with torch.no_grad():
        if mode != "torch.compile":
            return time_ms(lambda: call(*inputs), device, cpu_runs), ""
        start = time.perf_counter()
        call(*inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - start
        ms = time_ms(lambda: call(*inputs), device, cpu_runs)
    return ms, f"; {compile_backend}, first call {first:.0f} s"


def bench_model(key, batches, size, device, dtype, channels_last, modes, cpu_runs,
                compile_backend, parts=(FULL,)) -> list[Row]:
    name, config = MODELS[key]
    model, postprocessor = build(config)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, dtype=dtype, memory_format=fmt)
    rows = []
    # In MODES order, the unfolded baseline first whatever order the modes came in: every mode
    # after it runs the folded model (deploy() cannot be undone).
    for mode in [m for m in MODES if m in modes]:
        if mode != BASELINE:
            model.deploy()  # idempotent
        for batch in batches:
            images = torch.rand(batch, 3, size, size, device=device, dtype=dtype
                                ).contiguous(memory_format=fmt)
            sizes = torch.tensor([[size, size]] * batch, device=device)
            case = f"{size}x{size} bs{batch} {str(dtype).replace('torch.', '')}"
            try:
                results = run_mode(mode, model, postprocessor, images, sizes, device, cpu_runs,
                                   compile_backend, parts)
            except Exception as exc:  # noqa: BLE001 - a failing mode must not hide the others
                failed = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
                results = [(part, math.nan, failed) for part in parts]
            for part, ms, note in results:
                label = part_label(mode, part)
                rows.append(Row(name, case, label, ms, note=note))
                print(f"{name} {case} {label}: {ms:.2f} ms  {note}", flush=True)
    for row in rows:
        base = [r.ms for r in rows if r.implementation == BASELINE and r.case == row.case]
        if (base and row.implementation in MODES and row.implementation != BASELINE
                and not math.isnan(row.ms)):
            row.ratios = {BASELINE: base[0] / row.ms}
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtdetr bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="default: all (no CUDA graph on the CPU)")
    p.add_argument("--batch", type=int, nargs="+", help="default: 1 32 on a GPU, 1 on the CPU")
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--quick", action="store_true",
                   help="fewest repeats (5 CPU runs instead of 10); GPU timing unchanged")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the backbone, backbone + encoder and model without the "
                        "postprocessor in every mode (rtdetr.benchmark_parts)")
    p.add_argument("--out", help="folder for detector.md / detector.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    modes = args.modes or [m for m in MODES if gpu or "CUDA graph" not in m]
    batches = args.batch or ([1, 32] if gpu else [1])
    dtype = torch.float16 if gpu else torch.float32
    if gpu:
        torch.backends.cudnn.benchmark = True
    header = (f"# Detector end to end (model + postprocessor, random weights)\n\n"
              f"{machine_description(args.device)}; {'fp16' if gpu else 'fp32'} channels_last; "
              f"median of {'do_bench' if gpu else ('5' if args.quick else '10') + ' runs'}.")
    if not gpu:
        header += (f"\nOfficial RT-DETRv2-R18 folded, model forward, 640x640 batch 1 on the 2-core "
                   f"development CPU: {OFFICIAL_R18_CPU_MS:.0f} ms (anchors.md, a separate run).")
    rows = []
    for key in args.models:
        rows += bench_model(key, batches, args.size, args.device, dtype, True, modes,
                            5 if args.quick else 10, args.compile_backend,
                            PARTS if args.breakdown else (FULL,))
        write_outputs(rows, header, args.out, "detector", echo=False)
    backbone_budget(rows, MODELS["r18"][0], ISSUE7_FACTOR)  # with --breakdown and r18 only
    write_outputs(rows, header, args.out, "detector")
    failed = [r for r in rows if math.isnan(r.ms)]
    if failed:  # the table keeps their rows; a script sees the exit status
        print(f"rtdetr bench: {len(failed)} of {len(rows)} rows failed, e.g. {failed[0].group} "
              f"{failed[0].case} {failed[0].implementation}: {failed[0].note}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
