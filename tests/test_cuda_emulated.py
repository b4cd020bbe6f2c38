"""The CUDA kernels of csrc/cuda/, executed on the CPU by tests/cuda_emulation, against the
PyTorch reference (and the emulator's own semantics, so that its checks are known to fire).

The kernels are compiled from the real sources with the host C++ compiler (once per session,
cached on the sources' hash); skipped only when no C++ compiler exists. What the emulation does and
does not model: tests/cuda_emulation/__init__.py.
"""
import math

import pytest
import torch

from ghostkernels.reference import depthwise_conv as depthwise_ref
from ghostkernels.reference import ghost_conv as ghost_ref
from ghostkernels.reference import ms_deform_attn as msda_ref
from ghostkernels.ops.ms_deform_attn import fixed_point_scale
from tests.backend_params import TOLERANCE
from tests.cuda_emulation.kernels import EmulationError
from tests.msda_cases import make_inputs, rel_err


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# The emulator itself


def test_half_and_bfloat16_conversions_round_like_torch(emu):
    every_pattern = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    specials = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 2.0**-24, 2.0**-25,
                             1.5 * 2.0**-25, 2.0**-14 * (1 - 2.0**-11), 3.4e38, -3.4e38,
                             float("inf"), float("-inf"), float("nan"), 1 + 2.0**-11,
                             1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8])
    # Random floats over the whole half/bfloat16 range, plus exact ties (low bits 1000...0).
    spread = torch.randn(20000) * torch.exp2(torch.randint(-30, 20, (20000,)).float())
    ties_half = (spread.view(torch.int32) & ~0x1fff | 0x1000).view(torch.float32)
    ties_bf16 = (spread.view(torch.int32) & ~0xffff | 0x8000).view(torch.float32)
    floats = torch.cat([specials, spread, ties_half, ties_bf16])
    for kind, dtype in (("half", torch.float16), ("bfloat16", torch.bfloat16)):
        ours = emu.convert(every_pattern, "from_" + kind)
        theirs = every_pattern.view(dtype).float()
        assert torch.equal(ours.isnan(), theirs.isnan())
        finite = ~theirs.isnan()  # compared bit for bit (signed zeros, subnormals)
        assert torch.equal(ours[finite].view(torch.int32), theirs[finite].view(torch.int32))
        ours_bits = emu.convert(floats, kind)
        theirs_bits = floats.to(dtype).view(torch.int16)
        nan = floats.isnan()
        assert torch.equal(ours_bits[~nan], theirs_bits[~nan])
        assert ours_bits[nan].view(dtype).isnan().all()


def expected_shuffles(x, width, src, delta):
    """CUDA's documented results, lane by lane (selftest_kernels.cu: ``shuffles``)."""
    n = len(x)
    rows = []
    for t in range(n):
        lane, warp = t % 32, t - t % 32
        seg = lane - lane % width
        total = sum(x[warp + seg + i] for i in range(width))
        down = lane + delta if lane + delta < seg + width else lane
        up = lane - delta if lane - delta >= seg else lane
        rows.append([total, x[warp + seg + src % width], x[warp + down], x[warp + up]])
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("width,src,delta", [(32, 5, 1), (16, 17, 3), (8, 3, 2), (4, 0, 1),
                                             (2, 1, 1), (1, 0, 0)])
def test_shuffles_follow_the_cuda_definition(emu, width, src, delta):
    x = torch.randint(-50, 50, (64,)).float()  # integers: the butterfly sums are exact
    out = emu.selftest(0, x, 4 * 64, 64, width, src, delta).view(64, 4)
    assert torch.equal(out, expected_shuffles(x.tolist(), width, src, delta))


def test_shared_memory_is_per_block_and_barriers_order_it(emu):
    x = torch.randn(128)
    out = emu.selftest(1, x, 128, 64)
    assert torch.equal(out, torch.cat([x[:64].flip(0), x[64:].flip(0)]))


def test_reads_of_unwritten_shared_memory_are_nan(emu):
    assert emu.selftest(6, torch.zeros(1), 64, 64).isnan().all()


def test_wmma_multiplies_like_torch(emu):
    a, b, c = (torch.randn(16, 16) for _ in range(3))
    out = emu.selftest(11, torch.cat([a.flatten(), b.flatten(), c.flatten()]), 256, 32)
    expected = a.half().double() @ b.half().double() + c.double()
    torch.testing.assert_close(out.view(16, 16).double(), expected, rtol=1e-5, atol=1e-5)


def test_async_copies_land_when_the_thread_waits(emu):
    x = torch.randn(128)
    out = emu.selftest(14, x, 64, 32).view(32, 2)
    assert out[:, 0].isnan().all()  # read before __pipeline_wait_prior: not there yet
    assert torch.equal(out[:, 1], x[::4])


@pytest.mark.parametrize("case,message", [
    (2, (r"thread \(3,0,0\).* returned while lanes of its warp wait for it in __shfl_sync at "
         r"tests/cuda_emulation/selftest_kernels.cu:\d+")),
    (3, r"returned while lanes of its warp wait for it in __shfl_xor_sync"),
    (4, r"reached __syncthreads at .*selftest_kernels.cu:\d+ while other threads wait at "),
    (5, r"deadlock: .*16 thread\(s\) in __shfl_sync at .*48 thread\(s\) in __syncthreads"),
    (7, r"the kernel wrote outside out"),
    (8, r"invalid block 2048x1x1"),
    (9, r"misaligned address \d+ for .*float4.* \(needs 16-byte alignment\)"),
    (10, r"thread \(63,0,0\).*: index 64 out of bounds for .*float \[64\]"),
    (12, r"wmma::load_matrix_sync with a pointer not 256-bit aligned at .*selftest_kernels.cu"),
    (13, r"wmma::load_matrix_sync: lanes of the warp passed different pointers"),
    (15, r"misaligned address in __pipeline_memcpy_async"),
])
def test_the_emulator_reports_kernel_bugs(emu, case, message):
    with pytest.raises(EmulationError, match=message):
        emu.selftest(case, torch.randn(64), 64, 64)


# ------------------------------------------------------------------------------------------------
# Multi-scale deformable attention (csrc/cuda/ms_deform_attn_kernel.cu)


def msda_inputs(dtype, D, shapes=((5, 7), (3, 4)), N=2, M=2, Lq=5, P=4, loc_range=(-0.1, 1.1)):
    value, shapes_t, starts, loc, weights = make_inputs(N, list(shapes), M, D, Lq, P, dtype=dtype,
                                                        loc_range=loc_range)
    return value, shapes_t, starts, loc.to(acc_dtype(dtype)), weights


def check_msda(emu, inputs, *, arch=900, offset=0, forward_only=False, softmax=False,
               fixed_point=False):
    """Emulated forward and backward against the float64 reference on the same (rounded) inputs:
    the output within the dtype's forward tolerance; the gradients, which the kernel returns in
    the accumulation dtype, within that dtype's tolerance. ``softmax``: the weights are logits
    (softmax fused into the kernel); ``fixed_point``: the deterministic grad_value path with the
    scale the op layer would pass."""
    value, shapes, starts, loc, weights = inputs
    exact = (value.double(), shapes, starts, loc.double(), weights.double())
    out = emu.msda_forward(*inputs, arch=arch, offset=offset, softmax=softmax)
    ref = msda_ref.forward(*exact, softmax=softmax)
    assert out.dtype == value.dtype and not out.isnan().any()
    assert rel_err(out, ref) < TOLERANCE[value.dtype][0]
    if forward_only:
        return
    grad_out = torch.randn(ref.shape, dtype=torch.float64).to(value.dtype)
    scale = (fixed_point_scale(grad_out, weights, loc.shape[1], loc.shape[4], softmax)
             if fixed_point else None)
    grads = emu.msda_backward(grad_out, *inputs, arch=arch, offset=offset, softmax=softmax,
                              fixed_point_scale=scale)
    ref_grads = msda_ref.backward(grad_out.double(), *exact, softmax=softmax)
    for name, got, want in zip(("value", "locations", "weights"), grads, ref_grads):
        assert got.dtype == acc_dtype(value.dtype)
        assert rel_err(got, want) < TOLERANCE[acc_dtype(value.dtype)][1], name
    return grads


# (dtype, D): the launcher's vector width (elements per lane access, <= 16 bytes, dividing D)
# is given in the comment; D = 2 * lanes-worth also makes some lanes idle.
VECTOR_CASES = [
    (torch.float64, 4),    # vec 2
    (torch.float64, 3),    # vec 1
    (torch.float32, 8),    # vec 4
    (torch.float32, 6),    # vec 2
    (torch.float32, 5),    # vec 1
    (torch.float16, 16),   # vec 8
    (torch.float16, 12),   # vec 4
    (torch.float16, 6),    # vec 2
    (torch.bfloat16, 8),   # vec 8
    (torch.bfloat16, 3),   # vec 1
]


@pytest.mark.parametrize("dtype,D", VECTOR_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_msda_matches_reference_for_every_vector_width(emu, dtype, D):
    check_msda(emu, msda_inputs(dtype, D))


@pytest.mark.parametrize("arch", [800, 900])
@pytest.mark.parametrize("dtype,D", [(torch.float32, 8), (torch.float32, 2), (torch.float16, 8)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_msda_backward_atomic_paths(emu, arch, dtype, D):
    """sm_90 adds float4/float2 vectors into grad_value, older GPUs one float at a time."""
    check_msda(emu, msda_inputs(dtype, D, Lq=9), arch=arch)


def test_msda_more_points_than_lanes_and_chunk_loops(emu):
    # float32, D = 256: vec 4, 64 chunks -> 32 lanes and 2 chunk iterations; P = 36 > 32 lanes.
    check_msda(emu, msda_inputs(torch.float32, 256, N=1, M=1, Lq=2, P=36, shapes=((3, 5), (2, 2))))


def test_msda_grid_stride_loop(emu):
    """One SM: the launcher caps the grid at one wave (16 blocks), so blocks loop over groups."""
    # float64, D = 64: vec 2, 32 lanes -> 4 groups per block; 2*20*2 = 80 groups > 16 * 4.
    inputs = msda_inputs(torch.float64, 64, N=2, M=2, Lq=20, P=3)
    emu.set_sm_count(1)
    try:
        before = emu.counters("ms_deform_attn_sm90")["blocks"]
        check_msda(emu, inputs, forward_only=True)
        assert emu.counters("ms_deform_attn_sm90")["blocks"] - before == 16
    finally:
        emu.set_sm_count(2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_msda_small_launch_narrows_vectors_for_more_lanes(emu, dtype):
    """A launch that fills few of the device's thread slots (batch 1 on a 132-SM GPU) gives each
    (n, q, m) group 32 lanes of one channel instead of D / 16 bytes lanes of 16 bytes: 4 groups
    per 128-thread block instead of 32 (fp16) / 16 (fp32). Same results."""
    inputs = msda_inputs(dtype, 32, N=1, M=2, Lq=16, P=3)  # 32 groups
    emu.set_sm_count(132)
    try:
        blocks = {}
        for threads_per_sm in (0, 2048):  # 0: no slots to fill, the widest vectors
            emu.set_threads_per_sm(threads_per_sm)
            before = emu.counters("ms_deform_attn_sm90")["blocks"]
            check_msda(emu, inputs)  # forward and backward: 2 launches
            blocks[threads_per_sm] = (emu.counters("ms_deform_attn_sm90")["blocks"] - before) // 2
    finally:
        emu.set_threads_per_sm(0)
        emu.set_sm_count(2)
    assert blocks == {0: 1 if dtype == torch.float16 else 2, 2048: 8}, blocks


@pytest.mark.parametrize("dtype,D,offset", [(torch.float32, 8, 1), (torch.float32, 8, 2),
                                            (torch.float16, 8, 2), (torch.float64, 4, 1)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_msda_misaligned_pointers_select_narrower_vectors(emu, dtype, D, offset):
    check_msda(emu, msda_inputs(dtype, D), offset=offset)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_msda_points_on_and_outside_the_borders(emu, dtype):
    """Locations whose pixel coordinates are exactly -1, -0.5, 0, integers, W-1, W-0.5, W and
    beyond (power-of-two maps: every one is exact in binary)."""
    shapes = ((4, 8), (2, 2), (1, 4))
    value, shapes_t, starts, loc, weights = msda_inputs(dtype, 4, shapes=shapes, Lq=6, P=6)
    for lvl, (h, w) in enumerate(shapes):
        for axis, size in ((0, w), (1, h)):
            pixel = torch.tensor([-1.5, -1.0, -0.75, -0.5, 0.0, 0.5, 1.0, size - 1.0, size - 0.5,
                                  size - 0.25, float(size), size + 0.5])
            choice = pixel[torch.randint(len(pixel), loc[..., lvl, :, axis].shape)]
            loc[..., lvl, :, axis] = ((choice + 0.5) / size).to(loc.dtype)
    check_msda(emu, (value, shapes_t, starts, loc, weights))


def test_msda_skips_levels_inconsistent_with_value(emu):
    """A level whose rows run past S (or has a zero size) contributes nothing and is never read."""
    value, _, _, loc, weights = msda_inputs(torch.float32, 4, shapes=((3, 4), (2, 3)), P=3)
    shapes = torch.tensor([[3, 4], [2, 3], [4, 4], [0, 5]])
    starts = torch.tensor([0, 12, 10, 0])  # level 2 would need rows 10..25 of S = 18
    loc4 = torch.cat([loc, loc], dim=3)
    weights4 = torch.cat([weights, weights], dim=3)
    out = emu.msda_forward(value, shapes, starts, loc4, weights4)
    ref = msda_ref.forward(value.double(), shapes[:2], starts[:2], loc.double(), weights.double())
    assert rel_err(out, ref) < TOLERANCE[torch.float32][0]


@pytest.mark.parametrize("dtype,D", [(torch.float64, 4), (torch.float32, 8), (torch.float16, 8),
                                     (torch.bfloat16, 3)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_msda_fused_softmax_matches_reference(emu, dtype, D):
    value, shapes, starts, loc, logits = msda_inputs(dtype, D)
    logits = (torch.randn(logits.shape, dtype=torch.float64) * 4).to(dtype)
    check_msda(emu, (value, shapes, starts, loc, logits), softmax=True)


def test_msda_fused_softmax_large_logits_and_more_points_than_lanes(emu):
    # float32, D = 64: 16 lanes; L * P = 2 * 20 = 40 logits, several per lane; logits of +-(58..60)
    # overflow exp() unless the maximum is subtracted first. (Logits spread over a much wider range
    # make the softmax nearly one-hot, and its float32 backward ill-conditioned in any kernel.)
    value, shapes, starts, loc, logits = msda_inputs(torch.float32, 64, N=1, M=2, Lq=3, P=20)
    signs = torch.randint(0, 2, logits.shape) * 2 - 1
    logits = signs * (58.0 + 2.0 * torch.rand(logits.shape))
    check_msda(emu, (value, shapes, starts, loc, logits), softmax=True)


def test_msda_fused_softmax_single_point_has_zero_logit_gradient(emu):
    value, shapes, starts, loc, logits = msda_inputs(torch.float32, 8, shapes=((4, 5),), P=1)
    grads = check_msda(emu, (value, shapes, starts, loc, logits), softmax=True)
    assert torch.equal(grads[2], torch.zeros_like(grads[2]))


def test_msda_at_the_rtdetr_decoder_shape(emu):
    """RT-DETR's decoder cross-attention (levels 80/40/20, 300 queries, 8 heads x 32 channels,
    4 points) at batch 2, fp16 with the fused softmax, on a 132-SM grid."""
    emu.set_sm_count(132)
    try:
        inputs = msda_inputs(torch.float16, 32, shapes=((80, 80), (40, 40), (20, 20)), N=2, M=8,
                             Lq=300, P=4, loc_range=(-0.05, 1.05))
        logits = (torch.randn(inputs[4].shape) * 2).half()
        check_msda(emu, (*inputs[:4], logits), softmax=True)
    finally:
        emu.set_sm_count(2)


@pytest.mark.parametrize("arch", [800, 900])
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("dtype,D", [(torch.float64, 4), (torch.float32, 8), (torch.float16, 8),
                                     (torch.bfloat16, 2)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_msda_fixed_point_backward(emu, dtype, D, softmax, arch):
    """The deterministic path: grad_value from int64 fixed-point sums, the other gradients
    bitwise those of the float path. Many queries sample a 2x2 map, so pixels collide."""
    inputs = msda_inputs(dtype, D, shapes=((2, 2), (1, 3)), Lq=12)
    seed = int(torch.randint(2**31, ()))  # the same grad_out for every run
    runs = []
    for fixed_point in (True, True, False):
        torch.manual_seed(seed)
        runs.append(check_msda(emu, inputs, arch=arch, softmax=softmax, fixed_point=fixed_point))
    fixed, again, plain = runs
    assert all(torch.equal(a, b) for a, b in zip(fixed, again))
    assert torch.equal(fixed[1], plain[1]) and torch.equal(fixed[2], plain[2])


# ------------------------------------------------------------------------------------------------
# Folded Ghost op (csrc/cuda/ghost_conv_kernel.cu)


def ghost_inputs(dtype, B=2, Cin=5, H=17, W=15, C1=7, out_channels=12, scale=False, gate=None,
                 residual=False):
    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(dtype)

    return {
        "x": t(B, Cin, H, W), "w_primary": t(C1, Cin) / math.sqrt(Cin), "b_primary": t(C1),
        "w_cheap": t(C1, 9) / 3, "b_cheap": t(C1), "out_channels": out_channels,
        "input_scale": t(B, Cin).abs().add(0.5).to(dtype) if scale else None,
        "gate": torch.rand(B, out_channels, *gate, dtype=torch.float64).to(dtype) if gate else None,
        "residual": t(B, out_channels, H, W) if residual else None,
    }


def check_ghost(emu, args, relu_primary, relu_cheap, channels_last, offset=0):
    y = emu.ghost_conv(relu_primary=relu_primary, relu_cheap=relu_cheap,
                       channels_last=channels_last, offset=offset, **args)
    exact = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    ref = ghost_ref.forward(relu_primary=relu_primary, relu_cheap=relu_cheap, **exact)
    assert y.dtype == args["x"].dtype and not y.isnan().any()
    assert rel_err(y, ref) < TOLERANCE[y.dtype][0]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_ghost_conv_matches_reference(emu, dtype, channels_last):
    check_ghost(emu, ghost_inputs(dtype), True, True, channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", [
    {"Cin": 35, "C1": 37, "out_channels": 74},  # 2 input chunks, 2 channel blocks, C2 = C1
    {"Cin": 3, "C1": 33, "out_channels": 40},   # C2 = 7 < C1, second channel block of 1 channel
    {"Cin": 1, "C1": 1, "out_channels": 1, "H": 1, "W": 1},  # no cheap channels, a 1x1 image
    {"H": 28, "W": 14, "C1": 4, "out_channels": 6},          # exact multiples of the 14x14 tile
], ids=["two_blocks", "c2_lt_c1", "1x1_image", "whole_tiles"])
def test_ghost_conv_channel_and_tile_edges(emu, case, channels_last):
    check_ghost(emu, ghost_inputs(torch.float32, **case), False, True, channels_last)


@pytest.mark.parametrize("relu_primary,relu_cheap", [(False, False), (True, False)])
@pytest.mark.parametrize("scale,gate,residual", [
    (True, None, False), (False, (5, 4), False), (False, None, True), (True, (17, 15), True),
    (True, (1, 1), True),
])
def test_ghost_conv_epilogues(emu, scale, gate, residual, relu_primary, relu_cheap):
    for channels_last, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        args = ghost_inputs(dtype, scale=scale, gate=gate, residual=residual)
        check_ghost(emu, args, relu_primary, relu_cheap, channels_last)


def test_ghost_conv_misaligned_pointers(emu):
    args = ghost_inputs(torch.float16, scale=True, gate=(3, 3), residual=True)
    check_ghost(emu, args, True, True, False, offset=1)


def test_ghost_conv_at_a_production_shape(emu):
    """GhostNetV3-1.0's widest Ghost module, 160 -> 960 at 20x20 (benchmark-protocol.md), fp16
    channels_last with SE scale, DFC gate and residual: 5 input chunks, 15 channel blocks, 4 tiles
    on a 132-SM grid."""
    emu.set_sm_count(132)
    try:
        args = ghost_inputs(torch.float16, B=1, Cin=160, H=20, W=20, C1=480, out_channels=960,
                            scale=True, gate=(10, 10), residual=True)
        check_ghost(emu, args, True, False, True)
    finally:
        emu.set_sm_count(2)


# ------------------------------------------------------------------------------------------------
# Folded depthwise conv (csrc/cuda/depthwise_conv_kernel.cu)


@pytest.mark.parametrize("kh,kw", [(3, 3), (5, 5), (3, 5), (1, 5), (1, 1)])
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_conv_matches_reference(emu, kh, kw, stride):
    for dtype, channels_last, relu in ((torch.float32, False, True), (torch.float16, True, False),
                                       (torch.bfloat16, False, False)):
        x = torch.randn(2, 5, 11, 9, dtype=torch.float64).to(dtype)
        weight = torch.randn(5, kh * kw, dtype=torch.float64).to(dtype)
        bias = torch.randn(5, dtype=torch.float64).to(dtype)
        y = emu.depthwise_conv(x, weight, bias, kh, kw, stride, relu, channels_last=channels_last)
        ref = depthwise_ref.forward(x.double(), weight.double(), bias.double(), kh, kw, stride,
                                    relu)
        assert y.shape == ref.shape and not y.isnan().any()
        assert rel_err(y, ref) < TOLERANCE[dtype][0], (dtype, channels_last)
