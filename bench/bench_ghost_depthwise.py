"""Benchmark ghostkernels.ghost_conv_depthwise (ghost1 + the stride-2 depthwise conv of a
GhostNetV3 bottleneck, the Ghost output never written) per backend against the same two steps
apart: cuDNN eager (conv1x1, dwconv3x3, cat, gate multiply, then the strided dwconv) and the two
ghostkernels ops in sequence on the same backend; at GhostNetV3-1.0's four stride-2 bottlenecks
at 640x640 (fp16, NCHW and channels_last, batch 1 and 32, with the DFC gate where the model has
one).

    python -m bench.bench_ghost_depthwise                 # GPU
    python -m bench.bench_ghost_depthwise --device cpu --batches 1 --dtype fp32
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.bench_ghost import DTYPES, conv_case_parser, eager_ghost, ghost_weights
from ghostkernels import backends, depthwise_conv, ghost_conv, ghost_conv_depthwise, use_backend
from ghostkernels.benchmark import Row, copy_bandwidth_gbs, machine_description, time_ms
from ghostkernels.benchmark import write_outputs

# GhostNetV3-1.0's stride-2 bottlenecks at 640x640: ghost1 (in, out channels), input size, the
# depthwise kernel size, and whether ghost1 has a DFC gate
SHAPES = {"16->48 @320 k3": (16, 48, 320, 3, False), "24->72 @160 k5": (24, 72, 160, 5, True),
          "40->240 @80 k3": (40, 240, 80, 3, True), "112->672 @40 k5": (112, 672, 40, 5, True)}
OP = "ghost_conv_depthwise"


def eager_ghost_depthwise(x, w1, b1, w2, b2, wd, bd, gate):
    g = eager_ghost(x, w1, b1, w2, b2)
    if gate is not None:
        g = g * F.interpolate(gate, size=g.shape[-2:], mode="nearest")
    return F.conv2d(g, wd, bd, stride=2, padding=wd.shape[-1] // 2, groups=wd.shape[0])


def main(argv=None):
    args = conv_case_parser(__doc__.splitlines()[0], SHAPES).parse_args(argv)
    device, dtype = args.device, DTYPES[args.dtype]
    shapes = args.shapes or (list(SHAPES) if device == "cuda" else ["40->240 @80 k3"])
    bandwidth = copy_bandwidth_gbs(device)
    # the reference is the eager composition: timed once, as the baseline
    names = [b for b in backends.runnable_backends(OP, device, dtype) if b != "reference"]
    apart = [b for b in backends.runnable_backends("ghost_conv", device, dtype)
             if b != "reference"]
    eager = "cuDNN eager" if device == "cuda" else "PyTorch eager"
    header = (f"### ghost_conv_depthwise ({machine_description(device)}; copy bandwidth "
              f"{bandwidth:.0f} GB/s read+write; floor: x read once, y written once)")
    rows = []
    with torch.no_grad():
        for shape in shapes:
            cin, cout, hw, k, has_gate = SHAPES[shape]
            w1, b1, w2, b2 = ghost_weights(cin, cout, device, dtype)
            wd = (torch.randn(cout, 1, k, k) / k).to(device, dtype)
            bd = (0.1 * torch.randn(cout)).to(device, dtype)
            for batch in args.batches:
                for fmt in args.formats:
                    layout = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
                    x = torch.randn(batch, cin, hw, hw, device=device, dtype=dtype)
                    x = x.contiguous(memory_format=layout)
                    gate = None
                    if has_gate:
                        gate = torch.rand(batch, cout, hw // 2, hw // 2, device=device,
                                          dtype=dtype).contiguous(memory_format=layout)
                    case = f"B{batch} {shape} {args.dtype} {fmt}"
                    out_hw = (hw - 1) // 2 + 1
                    floor = (x.numel() + batch * cout * out_hw ** 2
                             + (gate.numel() if gate is not None else 0)) * x.element_size()
                    floor_ms = floor / bandwidth / 1e6
                    base = {eager: time_ms(
                        lambda: eager_ghost_depthwise(x, w1, b1, w2, b2, wd, bd, gate), device)}
                    rows.append(Row("ghost+dw-s2-fwd", case, eager, base[eager], floor_ms))
                    for backend in apart:  # the two ops in sequence, Ghost output written
                        with use_backend(backend):
                            ms = time_ms(lambda: depthwise_conv(
                                ghost_conv(x, w1, b1, w2, b2, gate=gate), wd, bd, stride=2),
                                device)
                        rows.append(Row("ghost+dw-s2-fwd", case, f"{backend} (two ops)", ms,
                                        floor_ms, {eager: base[eager] / ms}))
                    for backend in names:
                        with use_backend(backend):
                            ms = time_ms(lambda: ghost_conv_depthwise(
                                x, w1, b1, w2, b2, wd, bd, gate=gate), device)
                        rows.append(Row("ghost+dw-s2-fwd", case, backend, ms, floor_ms,
                                        {eager: base[eager] / ms}))
                    write_outputs(rows, header, args.out, "ghost_depthwise", echo=False)
    write_outputs(rows, header, args.out, "ghost_depthwise")
    return rows


if __name__ == "__main__":
    main()
