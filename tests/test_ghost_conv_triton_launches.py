"""The Triton Ghost kernels at explicit launch configurations: the halo-tile kernel (the default)
and the row kernel, on images spanning several tiles in both dims, with one and several channel
and Cin blocks, every epilogue, against the float64 definition with plain PyTorch ops.

The op-level tests (test_ghost_conv*.py) run the default launch on small images, mostly one tile;
here tiles as small as the kernels allow (4 x 4 halo tiles: 2 x 2 outputs each) make every
tile's halo overlap its neighbours', and the persistent grid runs from one program looping over
every work item to one program per item (on CPU tensors the kernel sees one "SM"). Runs on the
GPU too (on CPU tensors through the Triton interpreter)."""
import pytest
import torch

from tests.backend_params import TOLERANCE, rel_err, require
from tests.test_ghost_conv import make_inputs
from tests.test_ghost_conv_epilogues import plain_ghost_extras

triton_ghost = pytest.importorskip("ghostkernels.triton.ghost_conv")
halo = triton_ghost.halo

CONFIGS = {
    "halo-4x4-c16-k16": halo.HaloLaunchConfig(4, 4, 16, 16, 1),
    "halo-4x8-c16-k16": halo.HaloLaunchConfig(4, 8, 16, 16, 2),
    "halo-8x4-c32-k32": halo.HaloLaunchConfig(8, 4, 32, 32, 2),
    "halo-16x16-default-like": halo.HaloLaunchConfig(16, 16, 32, 64, 8),
    "halo-8x16-one-program": halo.HaloLaunchConfig(8, 16, 16, 16, 4, programs_per_sm=1),
    "halo-8x8-many-programs": halo.HaloLaunchConfig(8, 8, 16, 16, 4, programs_per_sm=64),
    "rows-8x16-c16": triton_ghost.GhostLaunchConfig(8, 16, 16, 16, 4),
    "rows-4x16-c32": triton_ghost.GhostLaunchConfig(4, 16, 32, 16, 4),
}

# (B, Cin, C1, H, W, channels_last, act_p, act_c, out_channels, extras)
SHAPES = {
    "nchw-two-chan-blocks": (2, 21, 20, 9, 11, False, "relu", "relu", 40, ()),
    "cl-odd-split-cin-chunks": (1, 40, 19, 13, 7, True, "relu", None, 27, ()),
    "nchw-1-row": (1, 5, 6, 1, 19, False, None, "relu", 12, ()),
    "cl-1-col": (2, 3, 5, 17, 1, True, "relu", "relu", 7, ()),
    "cl-scale-gate-residual": (2, 12, 18, 10, 9, True, "relu", "relu", 30,
                               ("input_scale", "gate", "residual")),
    "nchw-gate": (1, 7, 17, 9, 10, False, "relu", None, 34, ("gate",)),
    "cl-residual": (1, 9, 6, 6, 15, True, None, None, 10, ("residual",)),
}


def _extras(shape, dtype, device):
    B, Cin, C1, H, W, cl, *_, oc, extras = shape
    gen = torch.Generator().manual_seed(7)
    fmt = torch.channels_last if cl else torch.contiguous_format
    out = {}
    if "input_scale" in extras:
        out["input_scale"] = 1.5 * torch.rand(B, Cin, generator=gen, dtype=torch.float64)
    if "gate" in extras:
        out["gate"] = torch.rand(B, oc, (H + 1) // 2, W // 2 or 1, generator=gen,
                                 dtype=torch.float64).contiguous(memory_format=fmt)
    if "residual" in extras:
        out["residual"] = torch.randn(B, oc, H, W, generator=gen,
                                      dtype=torch.float64).contiguous(memory_format=fmt)
    return {k: v.to(device=device, dtype=dtype) for k, v in out.items()}


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_launch_config_matches_definition(config_name, shape_name, dtype, poisoned_empty):
    device = require("triton", "ghost_conv", dtype)
    shape = SHAPES[shape_name]
    *_, act_p, act_c, oc, _ = shape
    x, w1, b1, w2, b2 = make_inputs(*shape[:6], dtype=dtype, device=device)
    extras = _extras(shape, dtype, device)
    C1, Cin = w1.shape[:2]
    y = triton_ghost.forward(x, w1.reshape(C1, Cin).contiguous(), b1,
                             w2.reshape(C1, 9).contiguous(), b2, act_p == "relu",
                             act_c == "relu", oc, config=CONFIGS[config_name], **extras)
    expected = plain_ghost_extras((x, w1, b1, w2, b2), act_p, act_c, oc, **extras)
    assert y.shape == expected.shape
    assert rel_err(y, expected) < TOLERANCE[dtype][0], rel_err(y, expected)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("C1, W", [(60, 80), (1, 1), (300, 6), (8, 7)])
def test_default_launch_is_a_valid_halo_config(C1, W, channels_last):
    cfg = halo.default_config(C1, W, channels_last)
    assert isinstance(cfg, halo.HaloLaunchConfig)
    pixels = cfg.halo_h * cfg.halo_w
    assert pixels >= 16 and pixels & (pixels - 1) == 0  # tl.dot's M: a power of two >= 16
    for block in (cfg.block_c, cfg.block_k):
        assert block >= 16 and block & (block - 1) == 0
    assert min(cfg.halo_h, cfg.halo_w) >= 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_halo_kernel_rounds_once_like_the_row_kernel(dtype):
    """One rounding (the kernel contract): the depthwise half must see x1 at better than the
    output's precision. The halo kernel reads x1 back from its fp32 scratch tile, so its result
    equals the row kernel's (which keeps x1 in fp32 registers) up to fp32 summation order; a
    depthwise of x1 rounded to the output dtype (e.g. read back from y) differs in ~20 % of the
    cheap half's elements."""
    device = require("triton", "ghost_conv", dtype)
    shape = (2, 24, 20, 13, 17, True, "relu", "relu", 40, ())
    x, w1, b1, w2, b2 = make_inputs(*shape[:6], dtype=dtype, device=device)
    C1, Cin = w1.shape[:2]
    args = (x, w1.reshape(C1, Cin).contiguous(), b1, w2.reshape(C1, 9).contiguous(), b2, True,
            True, 40)
    halo_y = triton_ghost.forward(*args, config=halo.HaloLaunchConfig(8, 16, 16, 16, 4))
    rows_y = triton_ghost.forward(*args, config=triton_ghost.GhostLaunchConfig(8, 16, 16, 16, 4))
    differs = (halo_y[:, C1:].float() != rows_y[:, C1:].float()).float().mean().item()
    assert torch.equal(halo_y[:, :C1], rows_y[:, :C1])
    assert differs < 0.01, differs  # ties of the final rounding only
