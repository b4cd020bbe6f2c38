"""The target-shape launches of the kernels, for a profiler (Nsight Compute) to read on a GPU.

    ncu --kernel-name regex:ghost_conv --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python -m bench.profile_kernels ghost --backends cuda

Runs each kernel ``--repeats`` times per backend: the Ghost op at B32 40->120 @80 fp16
channels_last (cuda and triton backends; issue 3's target), MSDA forward fp16 and forward+backward
fp32 at rtdetr-dec bs32 (issue 2's targets). The first launches compile and warm up: skip them in
the profiler (``--launch-skip``).
"""
from __future__ import annotations

import argparse

import torch

from bench.bench_ghost import ghost_weights
from bench.bench_msda import DEC_LEVELS, make_case
from ghostkernels import backends, ghost_conv, ms_deform_attn, use_backend


def ghost(repeats: int, names) -> None:
    x = torch.randn(32, 40, 80, 80, device="cuda", dtype=torch.float16)
    x = x.contiguous(memory_format=torch.channels_last)
    w1, b1, w2, b2 = ghost_weights(40, 120, "cuda", torch.float16)
    for backend in names:
        with use_backend(backend), torch.no_grad():
            for _ in range(repeats):
                ghost_conv(x, w1, b1, w2, b2)
    torch.cuda.synchronize()


def msda(repeats: int, names) -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype, backward in ((torch.float16, False), (torch.float32, True)):
        value, shapes, starts, loc, weights = make_case(32, DEC_LEVELS, 300, dtype, "cuda", gen)
        tensors = [t.requires_grad_(backward) for t in (value, loc, weights)]
        for backend in names:
            with use_backend(backend), torch.set_grad_enabled(backward):
                for _ in range(repeats):
                    out = ms_deform_attn(tensors[0], shapes, starts, tensors[1], tensors[2])
                    if backward:
                        out.sum().backward()
    torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernels", nargs="*", default=["ghost", "msda"], choices=["ghost", "msda"])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--backends", nargs="*", default=["cuda", "triton"],
                        choices=["cuda", "triton"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.profile_kernels launches CUDA kernels; no GPU is visible")
    names = [b for b in args.backends if backends.availability(b, "cuda").available]
    for name in args.kernels:
        {"ghost": ghost, "msda": msda}[name](args.repeats, names)


if __name__ == "__main__":
    main()
