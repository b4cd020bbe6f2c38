"""pytest-benchmark suite of the ghostkernels ops: every backend available here, per op and case.

    pytest bench/test_benchmarks.py --benchmark-only                # on this machine's device
    pytest bench/test_benchmarks.py --benchmark-only --benchmark-autosave   # keep the run
    pytest bench/test_benchmarks.py --benchmark-only --benchmark-compare    # vs the last saved
    pytest bench/test_benchmarks.py --benchmark-only -k "msda and bs32"

Each benchmark group is one op at one case, so pytest-benchmark's tables put the backends side by
side; the ``reference`` backend is the PyTorch baseline (the grid_sample core for MSDA, cuDNN /
oneDNN convolutions and ``torch.cat`` for the Ghost ops). Cases: on a GPU the standard cases of
benchmark-protocol.md (MSDA: rtdetr-dec bs1/bs32, rtdetr-train bs16 q500, ddetr-enc bs2, fp16
and fp32; Ghost ops: the Ghost shapes at batch 1 and 32, fp16, NCHW and channels_last); on the
CPU a subset at batch 1 in fp32, without Triton (its interpreter is a test tool, not a backend to
time). On a GPU every call ends with ``torch.cuda.synchronize()``, so the times are host wall
times including launch overhead, as an eager caller sees them; the device-time tables with
floors and CUDA-graph replays come from ``bench/bench_*.py``. This suite is for tracking changes
commit to commit with pytest-benchmark's save/compare. With ``--benchmark-disable`` every case
runs once, as a plain test (CI does so: tests/test_benchmark_suite.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.bench_ghost import SHAPES as GHOST_SHAPES
from bench.bench_ghost import ghost_weights
from bench.bench_msda import CASES as MSDA_CASES
from bench.bench_msda import make_case
from bench.bench_ghost_depthwise import SHAPES as GHOST_DEPTHWISE_ALL_SHAPES
from ghostkernels import (backends, depthwise_conv, dfc_gate, ghost_conv, ghost_conv_depthwise,
                          ms_deform_attn, se_excitation, use_backend)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
MSDA_CASE_NAMES = list(MSDA_CASES) if GPU else ["rtdetr-dec bs1"]
MSDA_DTYPES = [torch.float16, torch.float32] if GPU else [torch.float32]
CONV_DTYPE = torch.float16 if GPU else torch.float32
GHOST_SHAPE_NAMES = list(GHOST_SHAPES) if GPU else ["40->120 @80"]
BATCHES = [1, 32] if GPU else [1]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# GhostNetV3-1.0's DFC gates (input channels, output channels, input size at 640x640) and SE
# blocks (channels, hidden units)
DFC_SHAPES = {"72->72 @80": (72, 72, 80), "120->120 @80": (120, 120, 80),
              "480->480 @40": (480, 480, 40)} if GPU else {"120->120 @80": (120, 120, 80)}
SE_SHAPES = {"72:20": (72, 20), "480:120": (480, 120), "960:240": (960, 240)}
# GhostNetV3-1.0's stride-2 bottlenecks (ghost1 + stride-2 depthwise conv; bench_ghost_depthwise)
GHOST_DEPTHWISE_SHAPES = GHOST_DEPTHWISE_ALL_SHAPES if GPU else {
    "40->240 @80 k3": GHOST_DEPTHWISE_ALL_SHAPES["40->240 @80 k3"]}


def _backends(op: str, dtype: torch.dtype) -> list[str]:
    # no Triton on the CPU: its interpreter is a test tool, not a backend to time
    return [b for b in backends.runnable_backends(op, DEVICE, dtype) if GPU or b != "triton"]


def _dtype_id(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def _params(op: str, dtypes) -> list:
    return [pytest.param(dtype, backend, id=f"{_dtype_id(dtype)}-{backend}")
            for dtype in dtypes for backend in _backends(op, dtype)]


def _run(benchmark, group: str, backend: str, fn):
    """Time ``fn`` with ``backend`` forced, synchronising after every call on a GPU."""
    benchmark.group = group
    benchmark.extra_info["device"] = DEVICE

    def call():
        with use_backend(backend):
            fn()
        if GPU:
            torch.cuda.synchronize()

    call()  # warm-up: kernel compilation and caches outside the timing
    benchmark(call)


@pytest.mark.parametrize("case", MSDA_CASE_NAMES)
@pytest.mark.parametrize("dtype,backend", _params("ms_deform_attn", MSDA_DTYPES))
def test_msda_forward(benchmark, case, dtype, backend):
    args = make_case(*MSDA_CASES[case], dtype, DEVICE, torch.Generator().manual_seed(0))
    with torch.no_grad():
        _run(benchmark, f"msda-fwd {case} {_dtype_id(dtype)}", backend,
             lambda: ms_deform_attn(*args))


@pytest.mark.parametrize("case", MSDA_CASE_NAMES)
@pytest.mark.parametrize("dtype,backend", _params("ms_deform_attn", MSDA_DTYPES))
def test_msda_forward_backward(benchmark, case, dtype, backend):
    value, shapes, starts, loc, weights = make_case(*MSDA_CASES[case], dtype, DEVICE,
                                                    torch.Generator().manual_seed(0))
    leaves = [t.requires_grad_() for t in (value, loc, weights)]
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3],
                       device=DEVICE).to(dtype)

    def step():
        ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2]).backward(grad)

    _run(benchmark, f"msda-fwd+bwd {case} {_dtype_id(dtype)}", backend, step)


def _ghost_inputs(shape: str, batch: int, fmt: str):
    cin, cout, hw = GHOST_SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, hw, hw, generator=g).to(DEVICE, CONV_DTYPE)
    return (x.contiguous(memory_format=FORMATS[fmt]),
            *ghost_weights(cin, cout, DEVICE, CONV_DTYPE, generator=g))


def _ghost_shape_cases(op: str):
    """Parametrise a benchmark over the Ghost shapes x batches x memory formats x ``op``'s
    backends."""
    def decorate(fn):
        for name, values in (("fmt", list(FORMATS)), ("batch", BATCHES),
                             ("shape", GHOST_SHAPE_NAMES), ("backend", _backends(op, CONV_DTYPE))):
            fn = pytest.mark.parametrize(name, values)(fn)
        return fn
    return decorate


@_ghost_shape_cases("ghost_conv")
def test_ghost_conv(benchmark, shape, batch, fmt, backend):
    x, w1, b1, w2, b2 = _ghost_inputs(shape, batch, fmt)
    with torch.no_grad():
        _run(benchmark, f"ghost-fwd B{batch} {shape} {_dtype_id(CONV_DTYPE)} {fmt}", backend,
             lambda: ghost_conv(x, w1, b1, w2, b2))


@_ghost_shape_cases("depthwise_conv")
def test_depthwise_conv(benchmark, shape, batch, fmt, backend):
    x, w1, b1, w2, b2 = _ghost_inputs(shape, batch, fmt)
    x1 = F.relu(F.conv2d(x, w1, b1)).contiguous(memory_format=FORMATS[fmt])
    with torch.no_grad():
        _run(benchmark, f"dw3x3-fwd B{batch} {shape} {_dtype_id(CONV_DTYPE)} {fmt}", backend,
             lambda: depthwise_conv(x1, w2, b2, 1, "relu"))


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", list(DFC_SHAPES))
@pytest.mark.parametrize("backend", _backends("dfc_gate", CONV_DTYPE))
def test_dfc_gate(benchmark, shape, batch, fmt, backend):
    cin, c, hw = DFC_SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, hw, hw, generator=g).to(DEVICE, CONV_DTYPE)
    x = x.contiguous(memory_format=FORMATS[fmt])
    params = [(torch.randn(*s, generator=g) * 0.2).to(DEVICE, CONV_DTYPE)
              for s in ((c, cin), (c,), (c, 1, 1, 5), (c,), (c, 1, 5, 1), (c,))]
    with torch.no_grad():
        _run(benchmark, f"dfc-gate B{batch} {shape} {_dtype_id(CONV_DTYPE)} {fmt}", backend,
             lambda: dfc_gate(x, *params))


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", list(GHOST_DEPTHWISE_SHAPES))
@pytest.mark.parametrize("backend", _backends("ghost_conv_depthwise", CONV_DTYPE))
def test_ghost_conv_depthwise(benchmark, shape, batch, fmt, backend):
    cin, cout, hw, k, has_gate = GHOST_DEPTHWISE_SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, hw, hw, generator=g).to(DEVICE, CONV_DTYPE)
    x = x.contiguous(memory_format=FORMATS[fmt])
    w1, b1, w2, b2 = ghost_weights(cin, cout, DEVICE, CONV_DTYPE, g)
    wd = (torch.randn(cout, 1, k, k, generator=g) / k).to(DEVICE, CONV_DTYPE)
    gate = None
    if has_gate:
        gate = torch.rand(batch, cout, hw // 2, hw // 2, generator=g).to(DEVICE, CONV_DTYPE)
        gate = gate.contiguous(memory_format=FORMATS[fmt])
    with torch.no_grad():
        _run(benchmark, f"ghost+dw-s2 B{batch} {shape} {_dtype_id(CONV_DTYPE)} {fmt}", backend,
             lambda: ghost_conv_depthwise(x, w1, b1, w2, b2, wd, None, gate=gate))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", list(SE_SHAPES))
@pytest.mark.parametrize("backend", _backends("se_excitation", CONV_DTYPE))
def test_se_excitation(benchmark, shape, batch, backend):
    c, r = SE_SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(batch, c, generator=g).to(DEVICE, CONV_DTYPE)
    params = [(torch.randn(*s, generator=g) * 0.2).to(DEVICE, CONV_DTYPE)
              for s in ((r, c), (r,), (c, r), (c,))]
    with torch.no_grad():
        _run(benchmark, f"se-excitation B{batch} {shape} {_dtype_id(CONV_DTYPE)}", backend,
             lambda: se_excitation(pooled, *params))


@pytest.mark.parametrize("path", ["public op (eager path)", "custom op"])
def test_host_overhead_msda_forward_backward(benchmark, path):
    """Host time of one MSDA forward+backward on a tiny input (the kernel is negligible): the
    public op's eager path (ghostkernels/ops/eager.py) against the torch.library custom op it
    bypasses in eager mode."""
    import importlib
    op = importlib.import_module("ghostkernels.ops.ms_deform_attn")
    value, shapes, starts, loc, weights = make_case(1, [(4, 4), (2, 2)], 3, torch.float32,
                                                    DEVICE, torch.Generator().manual_seed(0))
    leaves = [t.requires_grad_() for t in (value, loc, weights)]
    if path == "custom op":
        def call(v, lo, w):
            return op._ms_deform_attn(v, shapes, starts, lo, w, False)
    else:
        def call(v, lo, w):
            return ms_deform_attn(v, shapes, starts, lo, w)

    def step():
        call(*leaves).sum().backward()

    backend = "cuda" if GPU else "cpu"
    if not backends.availability(backend, DEVICE).available:
        backend = "reference"
    _run(benchmark, "host-overhead msda fwd+bwd tiny", backend, step)
