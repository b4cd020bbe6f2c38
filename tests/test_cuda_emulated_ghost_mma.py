"""The tensor-core Ghost kernel (csrc/cuda/ghost_conv_mma_kernel.cu: float16 / bfloat16) on the
CUDA emulator, path by path, against the float64 reference.

The kernel's paths: x by 16-byte cp.async (channels_last, Cin % 8 == 0, aligned) or element by
element; one or several 64-channel input chunks; one or several 64-channel blocks of primary
channels, the last one partial (1-4 wmma fragments); channel pairs in the output pass (even
channel counts, aligned pointers; under 64 channels the lanes also split the tile's columns into
runs) or single channels; border tiles that zero the halo outside the
image; C2 <= C1 cheap channels. The emulator checks wmma's alignment and warp-uniformity rules
and lands each cp.async only when the thread waits for it (tests/cuda_emulation/).
"""
import pytest
import torch

from tests.test_cuda_emulated import check_ghost, ghost_inputs

DTYPES = [torch.float16, torch.bfloat16]
LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])


@LAYOUTS
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", [
    # GhostNetV3's 40 -> 120 module: cp.async x, channel pairs, 3 x 3 tiles, 4 fragments of
    # which the last is partial (60 channels)
    {"Cin": 40, "C1": 60, "out_channels": 120, "H": 17, "W": 30},
    # two input chunks (64 + 8), one full channel block, tiles that end one pixel in
    {"Cin": 72, "C1": 64, "out_channels": 128, "H": 9, "W": 15},
    # three chunks with Cin % 8 != 0 (element loads), three channel blocks (64, 64, 2),
    # C2 = 70 < C1, exactly one tile
    {"Cin": 130, "C1": 130, "out_channels": 200, "H": 8, "W": 14},
    # a 1 x 1 image: every halo pixel but one is outside
    {"Cin": 16, "C1": 24, "out_channels": 48, "H": 1, "W": 1},
    # odd channel counts (no pairs), no cheap channels at all
    {"Cin": 8, "C1": 5, "out_channels": 5, "H": 3, "W": 20},
    # odd out_channels with even C1: single channels again, C2 = 33
    {"Cin": 24, "C1": 34, "out_channels": 67, "H": 10, "W": 5},
    # GhostNetV3's 16 -> 16 module: 4 channel pairs, so 8 lane groups sweep runs of 2 columns
    # (7 runs in a 14-column tile, 5 in the last tile's 9 columns)
    {"Cin": 16, "C1": 8, "out_channels": 16, "H": 9, "W": 23},
    # one channel pair: 32 groups of one column each; a last tile one column wide
    {"Cin": 8, "C1": 2, "out_channels": 4, "H": 5, "W": 29},
    # C1 = 76: a full channel block (one group) and a 12-channel one (6 pairs: 4 groups of 4
    # columns, the last with 2), C2 = 74
    {"Cin": 24, "C1": 76, "out_channels": 150, "H": 8, "W": 16},
], ids=["ghostnet_40_120", "two_chunks", "three_blocks", "1x1_image", "no_cheap_half",
        "odd_out_channels", "ghostnet_16_16_runs", "one_pair", "partial_block_runs"])
def test_mma_kernel_matches_reference(emu, case, dtype, channels_last):
    check_ghost(emu, ghost_inputs(dtype, B=2, **case), True, True, channels_last)


@LAYOUTS
@pytest.mark.parametrize("scale,gate,residual,relu_primary,relu_cheap", [
    (True, None, False, True, False), (False, (5, 8), False, False, True),
    (False, None, True, True, True), (True, (9, 15), True, False, True),
    (True, (1, 1), True, True, False),
])
def test_mma_kernel_epilogues(emu, scale, gate, residual, relu_primary, relu_cheap,
                              channels_last):
    """The input scale (folded into the weight chunk), the nearest-upsampled gate and the
    residual, on the channel-pair path (even channels) and the single-channel path (odd)."""
    for dtype, Cin, C1, cout in ((torch.float16, 16, 20, 40), (torch.bfloat16, 12, 9, 17)):
        args = ghost_inputs(dtype, B=2, Cin=Cin, H=9, W=15, C1=C1, out_channels=cout, scale=scale,
                            gate=gate, residual=residual)
        check_ghost(emu, args, relu_primary, relu_cheap, channels_last)


@LAYOUTS
def test_mma_kernel_misaligned_pointers(emu, channels_last):
    """Pointers one element off: cp.async and channel pairs must fall back, not fault."""
    args = ghost_inputs(torch.float16, B=1, Cin=32, H=9, W=16, C1=32, out_channels=64,
                        scale=True, gate=(3, 3), residual=True)
    check_ghost(emu, args, True, True, channels_last, offset=1)


def test_mma_kernel_keeps_x1_in_float_for_the_depthwise_half(emu):
    """One rounding per output. x1 is 150-1000 (float16 ulp >= 0.125) and varies by 8/1024 per pixel
    along W; the depthwise taps (left minus right neighbour) cancel everything else. Kept in
    float, x1's differences survive (error ~1e-5); rounded to the dtype before the depthwise
    conv, they would come out as multiples of the ulp."""
    Cin, C1, H, W = 16, 16, 8, 14
    args = ghost_inputs(torch.float16, B=1, Cin=Cin, H=H, W=W, C1=C1, out_channels=2 * C1)
    x = (1 + torch.rand(1, Cin, H, 1, dtype=torch.float64)).half().double()
    x = x.expand(1, Cin, H, W).clone()
    x[:, 0] = 1 + torch.arange(W, dtype=torch.float64) / 1024  # exact in float16
    w1 = (10 + 30 * torch.rand(C1, Cin, dtype=torch.float64)).half().double()
    w1[:, 0] = 8.0
    taps = torch.zeros(C1, 9, dtype=torch.float64)
    taps[:, 3], taps[:, 5] = 1.0, -1.0
    args.update(x=x.half(), w_primary=w1.half(), w_cheap=taps.half(),
                b_cheap=torch.zeros(C1, dtype=torch.float16))
    y = emu.ghost_conv(relu_primary=False, relu_cheap=False, channels_last=True, **args)
    x1 = torch.einsum("ck,bkhw->bchw", w1, x) + args["b_primary"].double()[None, :, None, None]
    assert x1.amin() > 128  # float16 ulp >= 0.125 everywhere
    expected = x1[..., :-2] - x1[..., 2:]  # interior columns
    assert (y[:, C1:, :, 1:-1].double() - expected).abs().max() < 1e-3
