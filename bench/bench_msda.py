"""Benchmark ghostkernels.ms_deform_attn per backend against the grid_sample core (the reference
backend, which is RT-DETR's formulation) at the standard cases of benchmark-protocol.md.

    python -m bench.bench_msda                       # GPU if present, else CPU (bs1 only)
    python -m bench.bench_msda --device cpu --cases "rtdetr-dec bs1" --dtypes fp32
    python -m bench.bench_msda --out results/        # also writes msda.md / msda.json
    python -m bench.bench_msda --modes softmax-fwd     # fused softmax vs softmax + op only

Mode ``softmax-fwd``: ms_deform_attn_softmax (the softmax over the L*P logits inside the kernel)
against torch's softmax followed by ms_deform_attn, per backend.
"""
from __future__ import annotations

import argparse

import torch

from ghostkernels.benchmark import (Row, copy_bandwidth_gbs, cuda_graph_replay, machine_description,
                                    time_ms, write_outputs)
from ghostkernels import backends, ms_deform_attn, ms_deform_attn_softmax, use_backend

DEC_LEVELS = [(80, 80), (40, 40), (20, 20)]
CASES = {  # name -> (N, levels, Lq); 8 heads x 32 channels, 4 points per level
    "rtdetr-dec bs1": (1, DEC_LEVELS, 300),
    "rtdetr-dec bs32": (32, DEC_LEVELS, 300),
    "rtdetr-train bs16 q500": (16, DEC_LEVELS, 500),
    "ddetr-enc bs2": (2, [(100, 167), (50, 84), (25, 42), (13, 21)], 22223),
}
M, D, P = 8, 32, 4
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The original Deformable-DETR CUDA op, fp32, measured on an H100 (shared/spec/anchors.md):
# (case, "fwd"|"fwd+bwd") -> ms. Used for ratios only when this run is on an H100.
ORIGINAL_OP_H100 = {
    ("rtdetr-dec bs1", "fwd"): 0.0154, ("rtdetr-dec bs1", "fwd+bwd"): 0.0437,
    ("rtdetr-dec bs32", "fwd"): 0.1704, ("rtdetr-dec bs32", "fwd+bwd"): 0.6537,
    ("rtdetr-train bs16 q500", "fwd"): 0.1361, ("rtdetr-train bs16 q500", "fwd+bwd"): 0.4964,
    ("ddetr-enc bs2", "fwd"): 0.7781, ("ddetr-enc bs2", "fwd+bwd"): 2.8043,
}


def make_case(N, levels, Lq, dtype, device, generator):
    shapes = torch.tensor(levels, dtype=torch.int64, device=device)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(levels)
    value = torch.randn(N, S, M, D, generator=generator).to(device, dtype)
    loc = (torch.rand(N, Lq, M, L, P, 2, generator=generator) * 1.1 - 0.05).to(device)
    weights = torch.rand(N, Lq, M, L * P, generator=generator).softmax(-1)
    weights = weights.view(N, Lq, M, L, P).to(device, dtype)
    return value, shapes, starts, loc, weights


def floor_bytes(value, loc, weights, Lq, backward: bool) -> int:
    out = value.shape[0] * Lq * M * D * value.element_size()
    fwd = (value.numel() * value.element_size() + loc.numel() * loc.element_size()
           + weights.numel() * weights.element_size() + out)
    if not backward:
        return fwd
    # backward reads value, loc, weights, grad_out; writes grad_value, grad_loc, grad_weights
    return 2 * fwd + value.numel() * value.element_size()


def softmax_rows(value, shapes, starts, loc, weights, names, device, label, bandwidth):
    """Forward with the softmax fused into the kernel vs torch softmax + ms_deform_attn."""
    logits = torch.randn(weights.shape, device=device).to(weights.dtype)
    N, Lq, _, L, P = logits.shape
    # the fused op never writes the weights: its floor is the plain forward's
    floor_ms = floor_bytes(value, loc, logits, Lq, False) / (bandwidth * 1e9) * 1e3
    rows = []
    for backend in names:
        if value.dtype not in backends.implementations("ms_deform_attn")[backend].dtypes:
            continue

        def fused(backend=backend):
            with use_backend(backend):
                ms_deform_attn_softmax(value, shapes, starts, loc, logits)

        def unfused(backend=backend):
            with use_backend(backend):
                w = logits.view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
                ms_deform_attn(value, shapes, starts, loc, w)

        with torch.no_grad():
            fused_ms, unfused_ms = time_ms(fused, device), time_ms(unfused, device)
        rows.append(Row("msda-softmax-fwd", label, f"{backend} softmax + op", unfused_ms,
                        floor_ms))
        rows.append(Row("msda-softmax-fwd", label, f"{backend} fused softmax", fused_ms, floor_ms,
                        {"softmax + op": unfused_ms / fused_ms}))
    return rows


def graphed_ms(fn, device, backward: bool = False) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (NaN if it cannot be captured); with
    ``backward`` the capture records the autograd backward too."""
    try:
        with torch.set_grad_enabled(backward):
            return time_ms(cuda_graph_replay(fn), device)
    except Exception as exc:  # noqa: BLE001 - report, do not lose the other rows
        print(f"CUDA graph capture failed: {type(exc).__name__}: {exc}", flush=True)
        return float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="*", default=None, help=f"subset of {list(CASES)}")
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "fp16"], choices=list(DTYPES))
    parser.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd", "softmax-fwd"],
                        choices=["fwd", "fwd+bwd", "softmax-fwd"])
    parser.add_argument("--out", default=None, help="directory for msda.md and msda.json")
    args = parser.parse_args(argv)
    device = args.device
    cases = args.cases or (list(CASES) if device == "cuda" else ["rtdetr-dec bs1"])
    on_h100 = device == "cuda" and "H100" in torch.cuda.get_device_name()
    bandwidth = copy_bandwidth_gbs(device)
    names = [b for b in ("reference", "cpu", "triton", "cuda")
             if backends.availability(b, device).available]
    gen = torch.Generator().manual_seed(0)
    header = (f"### ms_deform_attn ({machine_description(device)}; copy bandwidth "
              f"{bandwidth:.0f} GB/s read+write)")
    rows = []
    for case in cases:
        N, levels, Lq = CASES[case]
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            value, shapes, starts, loc, weights = make_case(N, levels, Lq, dtype, device, gen)
            for mode in args.modes:
                if mode == "softmax-fwd":
                    rows += softmax_rows(value, shapes, starts, loc, weights, names, device,
                                         f"{case} {dname}", bandwidth)
                    continue
                backward = mode == "fwd+bwd"
                floor_ms = floor_bytes(value, loc, weights, Lq, backward) / (bandwidth * 1e9) * 1e3
                results = {}
                for backend in names:
                    if dtype not in backends.implementations("ms_deform_attn")[backend].dtypes:
                        continue
                    v, l, w = (t.detach().requires_grad_(backward) for t in (value, loc, weights))
                    grad = torch.randn(N, Lq, M * D, device=device, dtype=dtype)

                    def fn(v=v, l=l, w=w, grad=grad, backend=backend):
                        with use_backend(backend):
                            out = ms_deform_attn(v, shapes, starts, l, w)
                            if backward:
                                torch.autograd.backward(out, grad)
                                v.grad = l.grad = w.grad = None

                    with torch.set_grad_enabled(backward):
                        results[backend] = time_ms(fn, device)
                    if device == "cuda":  # without the host's launch (and autograd) overhead
                        results[f"{backend} (CUDA graph)"] = graphed_ms(fn, device, backward)
                for backend, ms in results.items():
                    label = backend.replace("reference", "grid_sample (reference)")
                    ratios = {}
                    baseline = ("reference (CUDA graph)" if backend.endswith("(CUDA graph)")
                                else "reference")
                    if backend != baseline and baseline in results:
                        ratios["grid_sample"] = results[baseline] / ms
                    if on_h100 and (case, mode) in ORIGINAL_OP_H100:
                        ratios["orig CUDA op fp32 (anchors)"] = ORIGINAL_OP_H100[(case, mode)] / ms
                    rows.append(Row(f"msda-{mode}", f"{case} {dname}", label, ms, floor_ms, ratios))
            del value, loc, weights
            write_outputs(rows, header, args.out, "msda", echo=False)
    write_outputs(rows, header, args.out, "msda")
    return rows


if __name__ == "__main__":
    main()
