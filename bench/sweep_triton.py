"""Launch-configuration sweep of the Triton kernels on a GPU: each candidate block/warp setting is
checked against the default launch (same inputs, max abs difference) and timed, so one device
session can choose the defaults from measurements.

    python -m bench.sweep_triton --out results/        # GPU only
    python -m bench.sweep_triton --kernels ghost       # one kernel family

Kernels: the MSDA forward and backward at rtdetr-dec bs32 (fp16 and fp32), and the folded Ghost
op at the Ghost-op target shape (B32 40->120 @80, fp16, channels_last and NCHW, and channels_last
with the input scale and residual epilogues): halo-kernel tiles, and the row kernel's best.
A config that fails to compile or launch is reported as failed and the sweep goes on. The default
launch is marked in the table; candidates are sorted by time within each case.
"""
from __future__ import annotations

import argparse
import itertools
import math
import time

import torch

from bench.bench_ghost import ghost_weights
from bench.bench_msda import DEC_LEVELS, make_case
from ghostkernels.benchmark import Row, machine_description, time_ms, write_outputs


def _check_and_time(fn, expected, device, budget_end):
    """(ms, max abs difference to ``expected``, note); NaN when the config fails or time is up."""
    if time.time() > budget_end:
        return math.nan, math.nan, "skipped: sweep time budget spent"
    try:
        got = fn()
        if isinstance(got, tuple):
            diff = max(float((g.float() - e.float()).abs().max()) for g, e in zip(got, expected))
        else:
            diff = float((got.float() - expected.float()).abs().max())
        return time_ms(fn, device), diff, ""
    except Exception as exc:  # noqa: BLE001 - one bad config must not end the sweep
        return math.nan, math.nan, f"failed: {type(exc).__name__}: {str(exc)[:120]}"


def _rows(group, case, results, default_key):
    rows = []
    for key, (ms, diff, note) in sorted(results.items(), key=lambda kv: (math.isnan(kv[1][0]),
                                                                          kv[1][0])):
        label = key + (" (default)" if key == default_key else "")
        base = results[default_key][0]
        ratios = ({"default": base / ms} if key != default_key and not math.isnan(ms + base)
                  else {})
        rows.append(Row(group, case, label, ms, None, ratios,
                        note or f"max abs diff to default {diff:.2e}"))
    return rows


def _msda_key(cfg) -> str:
    return f"q{cfg.block_q} d{cfg.block_d} w{cfg.num_warps}"


def _ghost_key(cfg) -> str:
    if hasattr(cfg, "halo_h"):
        return (f"halo {cfg.halo_h}x{cfg.halo_w} c{cfg.block_c} k{cfg.block_k} "
                f"w{cfg.num_warps} p{cfg.programs_per_sm}")
    return f"rows h{cfg.block_h} w{cfg.block_w} c{cfg.block_c} k{cfg.block_k} w{cfg.num_warps}"


def sweep_msda(device, budget_end, N=32, Lq=300, levels=DEC_LEVELS):
    from ghostkernels.triton import ms_deform_attn as tk

    rows = []
    gen = torch.Generator().manual_seed(0)
    num_sms = tk._num_sms(torch.device(device))
    # the cases of the targets: forward fp16, forward+backward fp32
    for kind, dtype, tile in (("fwd", torch.float16, tk.FORWARD_TILE),
                              ("bwd", torch.float32, tk.BACKWARD_TILE)):
        value, shapes, starts, loc, weights = make_case(N, levels, Lq, dtype, device, gen)
        M, D = value.shape[2:]
        grad = torch.randn(N, Lq, M * D, device=device, dtype=dtype)
        case = f"{len(levels)} levels bs{N} q{Lq} {str(dtype).replace('torch.', '')}"
        default = tk.launch_config(N, Lq, M, D, num_sms, tile)
        configs = {default}
        for block_q, warps in itertools.product((4, 8, 16, 32, 64), (1, 2, 4, 8)):
            per_thread = block_q * default.block_d // (32 * warps)
            if per_thread in (2, 4, 8):
                configs.add(tk.LaunchConfig(block_q, default.block_d, warps))

        def run(cfg, kind=kind):
            if kind == "fwd":
                return tk._launch_forward(value, shapes, starts, loc, weights, cfg)
            return tk._launch_backward(grad, value, shapes, starts, loc, weights, cfg)

        expected = run(default)
        results = {}
        for cfg in [default] + sorted(configs - {default}, key=lambda c: (c.block_q, c.num_warps)):
            results[_msda_key(cfg)] = _check_and_time(lambda cfg=cfg: run(cfg), expected, device,
                                                      budget_end)
        rows += _rows(f"triton-msda-{kind}", case, results, _msda_key(default))
    return rows


def sweep_ghost(device, budget_end, batch=32, hw=80):
    from ghostkernels.triton import ghost_conv as tk

    rows = []
    cin, cout = 40, 120
    dtype = torch.float16
    w1, b1, w2, b2 = ghost_weights(cin, cout, device, dtype)
    # halo kernel (halo_h, halo_w, block_c, block_k, warps[, programs per SM]): pixel tiles of
    # 128/256/512, channel blocks 16/32/64, 4/8/16 warps, 2/4/8 programs per SM; the row kernel
    # (block_h, block_w, block_c, block_k, warps) at its measured channels_last best and NCHW
    # default, for comparison.
    halo_candidates = [(8, 16, 32, 16, 8, 2), (8, 16, 32, 16, 8, 8), (16, 16, 16, 16, 8),
                       (8, 16, 16, 16, 8), (16, 8, 32, 16, 8), (8, 16, 32, 16, 4),
                       (8, 16, 32, 16, 4, 8), (16, 16, 32, 16, 8), (8, 16, 64, 16, 8),
                       (8, 32, 16, 16, 8), (4, 32, 32, 16, 4), (16, 16, 16, 16, 4),
                       (8, 16, 32, 32, 8), (32, 16, 16, 16, 16), (16, 32, 16, 16, 16)]
    row_candidates = [(8, 16, 32, 16, 4), (8, 32, 16, 16, 4)]
    cases = [("nhwc", ()), ("nchw", ()), ("nhwc", ("input_scale", "residual"))]
    for fmt, extras in cases:
        mem = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
        x = torch.randn(batch, cin, hw, hw, device=device, dtype=dtype).contiguous(
            memory_format=mem)
        kwargs = {}
        if "input_scale" in extras:
            kwargs["input_scale"] = torch.rand(batch, cin, device=device, dtype=dtype)
        if "residual" in extras:
            kwargs["residual"] = torch.randn(batch, cout, hw, hw, device=device,
                                             dtype=dtype).contiguous(memory_format=mem)
        default = tk.halo.default_config(cout // 2, hw, fmt == "nhwc")

        def run(cfg, x=x, kwargs=kwargs):
            return tk.forward(x, w1, b1, w2, b2, True, True, cout, config=cfg, **kwargs)

        expected = run(default)
        results = {}
        configs = ([default] + [tk.halo.HaloLaunchConfig(*t) for t in halo_candidates]
                   + [tk.GhostLaunchConfig(*t) for t in row_candidates])
        for cfg in dict.fromkeys(configs):
            results[_ghost_key(cfg)] = _check_and_time(lambda cfg=cfg: run(cfg), expected, device,
                                                       budget_end)
        label = f"B{batch} g {cin}->{cout} @{hw} fp16 {fmt}" + "".join(f" +{e}" for e in extras)
        rows += _rows("triton-ghost-fwd", label, results, _ghost_key(default))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="*", default=["msda", "ghost"],
                        choices=["msda", "ghost"])
    parser.add_argument("--seconds", type=float, default=240,
                        help="time budget; configs left when it is spent are reported as skipped")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.sweep_triton times Triton launches on a GPU; none is available")
    device = "cuda"
    budget_end = time.time() + args.seconds
    header = f"### Triton launch-config sweep ({machine_description(device)})"
    rows = []
    for kernel in args.kernels:
        rows += {"msda": sweep_msda, "ghost": sweep_ghost}[kernel](device, budget_end)
        write_outputs(rows, header, args.out, "sweep", echo=False)
    write_outputs(rows, header, args.out, "sweep")
    return rows


if __name__ == "__main__":
    main()
