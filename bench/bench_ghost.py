"""Benchmark ghostkernels.ghost_conv and depthwise_conv per backend against cuDNN eager
(conv1x1, dwconv3x3, cat) and torch.compile of the same, at the Ghost shapes of
benchmark-protocol.md (fp16, NCHW and channels_last, batch 1 and 32, ReLU on both halves).

    python -m bench.bench_ghost                 # GPU
    python -m bench.bench_ghost --device cpu --batches 1 --dtype fp32 --shapes "40->120 @80"
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ghostkernels.benchmark import Row, copy_bandwidth_gbs, machine_description, time_ms, write_outputs
from ghostkernels import backends, depthwise_conv, ghost_conv, use_backend

SHAPES = {"16->48 @320": (16, 48, 320), "24->72 @160": (24, 72, 160), "40->120 @80": (40, 120, 80),
          "80->200 @40": (80, 200, 40), "160->960 @20": (160, 960, 20)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def ghost_weights(cin: int, cout: int, device, dtype, generator=None):
    """``(w1, b1, w2, b2)`` of a folded Ghost module ``cin -> cout``: the 1x1 conv
    ``[cout//2, cin, 1, 1]`` (scale 1/sqrt(cin)), the depthwise 3x3 ``[cout//2, 1, 3, 3]`` (scale
    1/3) and biases of scale 0.1, drawn on the CPU (``generator``) and moved to ``device``."""
    c1 = cout // 2

    def draw(*shape, scale):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

    return (draw(c1, cin, 1, 1, scale=cin ** -0.5), draw(c1, scale=0.1),
            draw(c1, 1, 3, 3, scale=1 / 3), draw(c1, scale=0.1))


def eager_ghost(x, w1, b1, w2, b2):
    x1 = F.relu(F.conv2d(x, w1, b1))
    x2 = F.relu(F.conv2d(x1, w2, b2, padding=1, groups=w2.shape[0]))
    return torch.cat([x1, x2], 1)


def row_kernel(x, w1, b1, w2, b2, cout):
    """The Triton row kernel (the default launch until the halo kernel) at its own measured
    default launch (``default_config``)."""
    from ghostkernels.triton import ghost_conv as triton_ghost
    c1, cin = w1.shape[:2]
    config = triton_ghost.default_config(x.shape[-1], not x.is_contiguous())
    return triton_ghost.forward(x, w1.reshape(c1, cin), b1, w2.reshape(c1, 9), b2, True, True,
                                cout, config=config)


def conv_case_parser(description: str, shapes) -> argparse.ArgumentParser:
    """The options of the conv benchmarks: device, shapes (a subset of ``shapes``), batches,
    dtype, memory formats and the output folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="*", default=None, help=f"subset of {list(shapes)}")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    parser.add_argument("--formats", nargs="*", default=["nchw", "nhwc"], choices=["nchw", "nhwc"])
    parser.add_argument("--out", default=None)
    return parser


def main(argv=None):
    parser = conv_case_parser(__doc__.splitlines()[0], SHAPES)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args(argv)
    device, dtype = args.device, DTYPES[args.dtype]
    shapes = args.shapes or (list(SHAPES) if device == "cuda" else ["40->120 @80"])
    bandwidth = copy_bandwidth_gbs(device)
    names = backends.runnable_backends("ghost_conv", device, dtype)
    compiled = None if args.no_compile else torch.compile(eager_ghost)
    eager = "cuDNN eager" if device == "cuda" else "PyTorch eager"
    header = (f"### ghost_conv / depthwise_conv ({machine_description(device)}; copy bandwidth "
              f"{bandwidth:.0f} GB/s read+write)")
    rows = []
    with torch.no_grad():
        for shape in shapes:
            cin, cout, hw = SHAPES[shape]
            c1 = cout // 2
            w1, b1, w2, b2 = ghost_weights(cin, cout, device, dtype)
            for batch in args.batches:
                for fmt in args.formats:
                    x = torch.randn(batch, cin, hw, hw, device=device, dtype=dtype)
                    if fmt == "nhwc":
                        x = x.contiguous(memory_format=torch.channels_last)
                    case = f"B{batch} g {shape} {args.dtype} {fmt}"
                    elem = x.element_size()
                    ghost_floor = (x.numel() + batch * cout * hw * hw) * elem / bandwidth / 1e6
                    dw_floor = 2 * batch * c1 * hw * hw * elem / bandwidth / 1e6
                    base = {eager: time_ms(lambda: eager_ghost(x, w1, b1, w2, b2), device)}
                    if compiled is not None:
                        base["torch.compile"] = time_ms(lambda: compiled(x, w1, b1, w2, b2), device)
                    for label, ms in base.items():
                        rows.append(Row("ghost-fwd", case, label, ms, ghost_floor))
                    x1 = F.relu(F.conv2d(x, w1, b1))
                    dw_eager = time_ms(lambda: F.conv2d(x1, w2, b2, padding=1, groups=c1), device)
                    rows.append(Row("dw3x3-fwd", case, eager, dw_eager, dw_floor))
                    for backend in names:
                        if backend == "reference":
                            continue  # the reference is the eager composition above
                        with use_backend(backend):
                            ms = time_ms(lambda: ghost_conv(x, w1, b1, w2, b2), device)
                            dw_ms = time_ms(lambda: depthwise_conv(x1, w2, b2), device)
                        rows.append(Row("ghost-fwd", case, backend, ms, ghost_floor,
                                        {k: v / ms for k, v in base.items()}))
                        rows.append(Row("dw3x3-fwd", case, backend, dw_ms, dw_floor,
                                        {eager: dw_eager / dw_ms}))
                    if "triton" in names:  # the previous Triton kernel, for comparison
                        ms = time_ms(lambda: row_kernel(x, w1, b1, w2, b2, cout), device)
                        rows.append(Row("ghost-fwd", case, "triton row kernel", ms, ghost_floor,
                                        {k: v / ms for k, v in base.items()},
                                        "launcher called directly, no op layer"))
                    write_outputs(rows, header, args.out, "ghost", echo=False)
    write_outputs(rows, header, args.out, "ghost")
    return rows


if __name__ == "__main__":
    main()
