"""The depthwise conv CUDA kernels (csrc/cuda/depthwise_conv_kernel.cu) on the CPU emulator: every
launch path (channels_last tiled kernel at each vector width, NCHW tiled kernel, generic kernel in
both layouts, scalar fallbacks for odd channel counts and misaligned pointers), every strip height
and block size the launcher picks, odd sizes, ReLU and NaN propagation, against the float64
reference.

Each case also checks which path ran: ``expected_launch`` mirrors the launcher's choice (vector
width, tiling, grid) and the emulator's launch counters must show that grid. If the launcher's
heuristics change, update the mirror with them.
"""
import contextlib
import math
from typing import NamedTuple

import pytest
import torch

from ghostkernels.reference import depthwise_conv as depthwise_ref
from tests.backend_params import TOLERANCE
from tests.msda_cases import rel_err

# The launcher's constants (depthwise_conv_kernel.cu)
TILED_SHAPES = {(3, 3, 1), (3, 3, 2), (5, 5, 1), (5, 5, 2), (1, 5, 1), (5, 1, 1)}
THREADS, MAX_ROWS, WEIGHT_REGS, ACC_REGS, RUN_REGS = 256, 16, 50, 16, 100
ELEMENT_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALVES = [torch.float16, torch.bfloat16]


def out_size(n, k, stride):
    return (n + 2 * (k // 2) - k) // stride + 1


def max_vec(dtype, taps):
    v = 16 // ELEMENT_BYTES[dtype]
    while v > 1 and v * taps > WEIGHT_REGS:
        v //= 2
    return v


def run_width(dtype, vec, kh, kw, stride):
    """Output pixels per thread of the channels_last tiled kernel (kernel's run_width)."""
    vec_regs = (vec * ELEMENT_BYTES[dtype] + 3) // 4
    for rw in (4, 2):
        seg = (rw - 1) * stride + kw
        regs = kh * kw * vec + vec * rw + kh * seg * vec_regs + 2 * seg
        if vec * rw <= ACC_REGS and regs <= RUN_REGS:
            return rw
    return 1


class Launch(NamedTuple):
    kernel: str   # nhwc_tiled, nchw_tiled, nhwc_generic, nchw_generic
    vec: int      # channels per thread (channels_last)
    rows: int     # strip height (tiled kernels; 1 for the generic ones)
    blocks: int
    threads: int  # per block


def tiled_items(B, C, H, W, kh, kw, stride, dtype, channels_last, offset):
    """(kernel, V, items(rows)) of the launcher's choice for this case; items None: generic."""
    Ho, Wo = out_size(H, kh, stride), out_size(W, kw, stride)
    vec = 1
    if channels_last:
        vec = 16 // ELEMENT_BYTES[dtype]
        while vec > 1 and not (C % vec == 0 and offset % vec == 0):
            vec //= 2
    if (kh, kw, stride) in TILED_SHAPES:
        if not channels_last:
            return "nchw_tiled", 1, lambda rows: B * math.ceil(Ho / rows) * C * Wo
        cap = max_vec(dtype, kh * kw)
        V = cap if vec >= cap else (cap // 2 if cap > 1 and vec >= cap // 2 else None)
        if V is not None:
            runs = math.ceil(Wo / run_width(dtype, V, kh, kw, stride))
            return "nhwc_tiled", V, lambda rows: B * math.ceil(Ho / rows) * (C // V) * runs
    return ("nhwc_generic" if channels_last else "nchw_generic"), vec, None


def expected_launch(B, C, H, W, kh, kw, stride, dtype, channels_last, offset, sms, per_sm):
    """The launch the launcher makes for this case on a device of ``sms`` x ``per_sm`` threads.

    Pointer alignment: kernels.py puts each buffer ``offset + guard`` elements into a 64-byte
    aligned allocation, guard = max(64, numel); numel is a multiple of C, so x and y are aligned
    to every V dividing both C and ``offset``."""
    kernel, vec, items = tiled_items(B, C, H, W, kh, kw, stride, dtype, channels_last, offset)
    Ho, Wo = out_size(H, kh, stride), out_size(W, kw, stride)
    if items is None:
        total = B * Ho * Wo * (C // vec if channels_last else C)
        return Launch(kernel, vec, 1, min(math.ceil(total / THREADS), 1 << 20), THREADS)
    rows = 1
    while rows < MAX_ROWS and rows < Ho and items(2 * rows) >= sms * per_sm // 2:
        rows *= 2
    threads = THREADS
    while threads > 64 and math.ceil(items(rows) / threads) < 2 * sms:
        threads //= 2
    return Launch(kernel, vec, rows, math.ceil(items(rows) / threads), threads)


@contextlib.contextmanager
def device(emu, sms, per_sm):
    emu.set_sm_count(sms)
    emu.set_threads_per_sm(per_sm)
    try:
        yield
    finally:  # the fixture's defaults, which the other tests assume
        emu.set_threads_per_sm(0)
        emu.set_sm_count(2)


def run_case(emu, B, C, H, W, kh, kw, stride, dtype, channels_last, *, relu=True, offset=0,
             sms=2, per_sm=0, nan_at=(), seed=0, expect=None):
    """Runs one case, checks the launch and the result; returns the expected launch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=g).to(dtype)
    for index in nan_at:
        x[index] = float("nan")
    weight = torch.randn(C, kh * kw, dtype=torch.float64, generator=g).to(dtype)
    bias = torch.randn(C, dtype=torch.float64, generator=g).to(dtype)
    launch = expected_launch(B, C, H, W, kh, kw, stride, dtype, channels_last, offset, sms,
                             per_sm)
    if expect is not None:
        assert launch[:len(expect)] == expect, launch  # the case covers the path it claims to
    before = emu.counters("ghost_ops")
    with device(emu, sms, per_sm):
        y = emu.depthwise_conv(x, weight, bias, kh, kw, stride, relu,
                               channels_last=channels_last, offset=offset)
    after = emu.counters("ghost_ops")
    grid = [after[k] - before[k] for k in ("launches", "blocks", "threads")]
    assert grid == [1, launch.blocks, launch.blocks * launch.threads], (launch, grid)
    ref = depthwise_ref.forward(x.double(), weight.double(), bias.double(), kh, kw, stride, relu)
    assert y.shape == ref.shape
    nan = ref.isnan()
    assert torch.equal(y.isnan(), nan), "NaN where the reference has none, or NaN lost"
    assert rel_err(y[~nan], ref[~nan]) < TOLERANCE[dtype][0], (dtype, launch)
    return launch


# ------------------------------------------------------------------------------------------------
# channels_last tiled kernel: each vector width, its half-cap fallback, and the generic fallback

# (dtype, C, offset): C and the pointers' misalignment (offset elements) pick the vector width;
# test_channels_last_cases_cover_every_vector_width checks that together they reach every one.
NHWC_VECTOR_CASES = [
    # fp16/bf16: 3x3 cap 4 (8-byte accesses), 1x5 cap 8 (16 bytes), 5x5 cap 2 (4 bytes)
    (torch.float16, 8, 0), (torch.float16, 24, 0), (torch.float16, 40, 0),
    (torch.float16, 12, 0), (torch.float16, 60, 0), (torch.float16, 16, 4),
    (torch.float16, 8, 2), (torch.float16, 6, 0), (torch.float16, 3, 0), (torch.float16, 1, 0),
    (torch.float16, 16, 1),
    (torch.bfloat16, 16, 0), (torch.bfloat16, 12, 0), (torch.bfloat16, 24, 2),
    (torch.bfloat16, 40, 1),
    # fp32: 3x3 cap 4 (16 bytes), 1x5 cap 4, 5x5 cap 2 (8 bytes)
    (torch.float32, 8, 0), (torch.float32, 12, 0), (torch.float32, 60, 2),
    (torch.float32, 6, 0), (torch.float32, 3, 0), (torch.float32, 24, 1),
]


@pytest.mark.parametrize("dtype,C,offset", NHWC_VECTOR_CASES,
                         ids=[f"{str(d)[6:]}-C{c}-off{o}" for d, c, o in NHWC_VECTOR_CASES])
def test_channels_last_vector_widths(emu, dtype, C, offset):
    # Wo = 9 (3x3 s1): runs of 4 end mid-way; H = 7; the stride-2 / 5x5 cases shrink it further.
    shapes = [(3, 3, 1), (3, 3, 2), (1, 5, 1), (5, 1, 1), (5, 5, 1), (5, 5, 2)]
    for n, (kh, kw, stride) in enumerate(shapes):
        run_case(emu, 2, C, 7, 9, kh, kw, stride, dtype, True, relu=n % 2 == 0, offset=offset,
                 seed=n)


def test_channels_last_cases_cover_every_vector_width():
    """The cases above reach every (kernel, V) pair the launcher can pick in channels_last."""
    seen = set()
    for dtype, C, offset in NHWC_VECTOR_CASES:
        for kh, kw, stride in [(3, 3, 1), (1, 5, 1), (5, 5, 1), (1, 1, 1)]:
            kernel, V = expected_launch(2, C, 7, 9, kh, kw, stride, dtype, True, offset, 2, 0)[:2]
            seen.add((str(dtype), kh * kw, kernel, V))
    for dtype in DTYPES:
        widest = 16 // ELEMENT_BYTES[dtype]
        for taps in (9, 5, 25):
            cap = max_vec(dtype, taps)
            assert (str(dtype), taps, "nhwc_tiled", cap) in seen, (dtype, taps, cap)
            if cap > 1:
                assert (str(dtype), taps, "nhwc_tiled", cap // 2) in seen, (dtype, taps)
        v = widest
        while v >= 1:  # the generic kernel at every width (1x1 is never tiled)
            assert (str(dtype), 1, "nhwc_generic", v) in seen, (dtype, v)
            v //= 2
        assert any(k == "nhwc_generic" and t == 9 for d, t, k, _ in seen if d == str(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kh,kw,stride", sorted(TILED_SHAPES))
def test_channels_last_tiled_odd_sizes(emu, dtype, kh, kw, stride):
    C = 8 if dtype == torch.float32 else 16
    for n, (B, H, W) in enumerate([(1, 1, 1), (3, 2, 7), (1, 17, 2), (2, 7, 33), (1, 33, 17)]):
        run_case(emu, B, C, H, W, kh, kw, stride, dtype, True, relu=n % 2 == 1, seed=n,
                 expect=("nhwc_tiled",))


# ------------------------------------------------------------------------------------------------
# NCHW tiled kernel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kh,kw,stride", sorted(TILED_SHAPES))
def test_nchw_tiled_odd_sizes(emu, dtype, kh, kw, stride):
    for n, (B, C, H, W) in enumerate([(1, 1, 1, 1), (3, 3, 2, 7), (1, 5, 17, 2), (2, 3, 7, 33),
                                      (1, 2, 33, 17)]):
        run_case(emu, B, C, H, W, kh, kw, stride, dtype, False, relu=n % 2 == 0,
                 offset=n % 2, seed=n, expect=("nchw_tiled",))


# ------------------------------------------------------------------------------------------------
# Strip heights and block sizes: the device size the launcher sees picks them


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kh,kw,stride", [(3, 3, 1), (3, 3, 2), (5, 5, 2), (5, 1, 1)])
def test_strip_heights_and_block_sizes(emu, channels_last, kh, kw, stride):
    """Every strip height 1..16 (strips ending mid-way through Ho = 33 or 17, the last strip
    shorter) and blocks of 64, 128 and 256 threads; the device size the launcher sees picks
    them, so each case sets the one that gives the height or block size it tests."""
    dtype = torch.float16 if channels_last else torch.bfloat16
    B, C, H, W = 3, (12 if channels_last else 3), 33, 19
    case = (B, C, H, W, kh, kw, stride, dtype, channels_last, 0)
    kernel, _, items = tiled_items(*case)
    for n, rows in enumerate([1, 2, 4, 8, 16]):
        # rows stops doubling once items(2 * rows) < sms * per_sm / 2 = items(rows)
        per_sm = items(rows)
        launch = run_case(emu, *case[:8], channels_last, relu=n % 2 == 0, sms=2,
                          per_sm=per_sm, seed=n, expect=(kernel, ))
        assert launch.rows == rows, launch
    for n, threads in enumerate([256, 128, 64]):
        # one row per thread (a huge device); threads stop halving once the grid gives every
        # SM 2 blocks
        sms = math.ceil(items(1) / threads) // 2
        launch = run_case(emu, *case[:8], channels_last, relu=n % 2 == 1, sms=sms,
                          per_sm=1 << 20, seed=n)
        assert launch.threads == threads, launch


# ------------------------------------------------------------------------------------------------
# Generic kernel: the other tap shapes and strides, both layouts, every vector width


GENERIC_SHAPES = [(1, 1, 1), (1, 1, 2), (1, 3, 1), (3, 1, 2), (3, 5, 1), (5, 3, 2), (1, 5, 2),
                  (5, 1, 2), (3, 5, 2), (5, 3, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_generic_shapes(emu, dtype, channels_last):
    # channels_last: C=16 offset 0 / C=8 offset 4 / C=12 offset 2 / C=3: every vector width
    layouts = [(16, 0), (8, 4), (12, 2), (3, 0), (16, 1)]
    for n, (kh, kw, stride) in enumerate(GENERIC_SHAPES):
        C, offset = layouts[n % len(layouts)]
        H, W = [(7, 9), (17, 2), (2, 17), (1, 5), (9, 7)][n % 5]
        kernel = "nhwc_generic" if channels_last else "nchw_generic"
        run_case(emu, 1 + n % 3, C, H, W, kh, kw, stride, dtype, channels_last,
                 relu=n % 2 == 0, offset=offset, seed=n, expect=(kernel,))


# ------------------------------------------------------------------------------------------------
# ReLU and NaN


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kh,kw,stride", [(3, 3, 1), (5, 5, 2), (3, 5, 1)])
def test_nan_propagates_through_relu(emu, channels_last, kh, kw, stride):
    """A NaN input makes exactly the outputs whose window holds it NaN, ReLU or not (ReLU keeps
    NaN, like torch.relu); padding never does. Corners, edges and interior."""
    for relu in (True, False):
        for dtype in (torch.float32, torch.float16):
            nan_at = [(0, 1, 0, 0), (0, 3, 4, 5), (1, 2, 8, 10), (1, 0, 0, 10)]
            run_case(emu, 2, 4, 9, 11, kh, kw, stride, dtype, channels_last, relu=relu,
                     nan_at=nan_at, seed=int(relu))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_relu_clamps_negative_outputs(emu, channels_last):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 9, 9, generator=g).half()
    weight = torch.randn(8, 9, generator=g).half()
    bias = torch.full((8,), -0.5).half()
    y = emu.depthwise_conv(x, weight, bias, 3, 3, 1, True, channels_last=channels_last)
    ref = depthwise_ref.forward(x.double(), weight.double(), bias.double(), 3, 3, 1, True)
    assert (ref == 0).float().mean() > 0.3  # enough clamped outputs for a real test
    assert (y[ref == 0] == 0).all() and (y >= 0).all()
    assert rel_err(y, ref) < TOLERANCE[torch.float16][0]


# ------------------------------------------------------------------------------------------------
# Shapes of GhostNetV3's depthwise convs (small spatial sizes), batch 1-3


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_ghostnet_like_shapes(emu, dtype, channels_last):
    for n, (B, C, H, W, k, stride) in enumerate([(1, 60, 10, 10, 3, 1), (2, 24, 16, 12, 3, 2),
                                                (3, 40, 6, 6, 5, 2), (1, 72, 8, 8, 5, 1)]):
        run_case(emu, B, C, H, W, k, k, stride, dtype, channels_last, relu=n % 2 == 0, seed=n,
                 per_sm=512 * (n % 2))
