"""The CUDA kernel of the DFC gate (csrc/cuda/dfc_gate_kernel.cu), executed on the CPU by
tests/cuda_emulation, against the float64 composition of the five torch ops.

What the emulation does and does not model: tests/cuda_emulation/__init__.py (out-of-bounds reads
hit NaN guard zones, writes outside the outputs raise, shared memory starts as NaN, barriers are
real).
"""
import pytest
import torch

from tests.backend_params import TOLERANCE
from tests.cuda_emulation.kernels import (GHOST_TYPES, _guarded_input, _int64s, _ints, _output,
                                          _ptr)
from tests.test_dfc_gate import CASES, make_inputs, plain_gate, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]


def emulated_dfc_gate(emu, x, w_proj, b_proj, w_h, b_h, w_v, b_v, *, channels_last, offset=0):
    """x and the result are NCHW tensors; ``channels_last`` selects the layout the kernels see (the
    wrapper permutes in and out)."""
    B, Cin, H, W = x.shape
    C = w_proj.shape[0]
    layout = (lambda t: t.permute(0, 2, 3, 1)) if channels_last else (lambda t: t)
    pooled_shape = tuple(layout(torch.empty(B, C, H // 2, W // 2)).shape)
    ins = [_guarded_input(t, offset) for t in (layout(x), w_proj.reshape(C, Cin), b_proj,
                                                w_h.reshape(C, 5), b_h, w_v.reshape(C, 5), b_v)]
    gate = _output(pooled_shape, x.dtype, offset)
    lib = emu.libs["dfc_gate"]
    status = lib.gk_dfc_gate(GHOST_TYPES[x.dtype], *(_ptr(g.view) for g in ins),
                             _ptr(gate.view),
                             _int64s(B, Cin, C, H, W), _ints(channels_last))
    emu._check(lib, status, "dfc_gate")
    gate.check_guards("the gate")
    return gate.view.permute(0, 3, 1, 2).clone() if channels_last else gate.view.clone()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_definition(emu, dtype, name):
    cfg = CASES[name]
    args = make_inputs(*cfg, dtype=dtype)
    out = emulated_dfc_gate(emu, *args, channels_last=cfg[-1])
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert out.shape == (cfg[0], cfg[2], cfg[3] // 2, cfg[4] // 2)
    assert rel_err(out, plain_gate(*args)) < TOLERANCE[dtype][0], cfg


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_several_input_chunks_and_tiles_misaligned(emu, channels_last):
    """Cin 70 (three 32-channel chunks, the last partial), C 40 (two channel blocks), 35 pooled
    pixels (two pixel blocks), batch 2, every buffer one element off its allocation."""
    args = make_inputs(2, 70, 40, 10, 15, False, dtype=torch.float32)
    out = emulated_dfc_gate(emu, *args, channels_last=channels_last, offset=1)
    assert rel_err(out, plain_gate(*args)) < TOLERANCE[torch.float32][0]


def test_both_layouts_agree_to_rounding(emu):
    args = make_inputs(1, 9, 12, 12, 9, False, dtype=torch.float32)
    nchw = emulated_dfc_gate(emu, *args, channels_last=False)
    cl = emulated_dfc_gate(emu, *args, channels_last=True)
    assert rel_err(cl, nchw) < 1e-6


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_stencil_reaches_across_tiles(emu, channels_last):
    """A 25 x 27 gate: 3 x 3 tiles of 12 x 12, the last ones partial, so the 5 x 5 stencil of
    pixels near a tile edge needs P of the neighbouring tiles (recomputed in the block's 16 x 16
    region); two input chunks (40 channels), two channel blocks (36), float16."""
    args = make_inputs(2, 40, 36, 50, 55, channels_last, dtype=torch.float16)
    out = emulated_dfc_gate(emu, *args, channels_last=channels_last)
    assert rel_err(out, plain_gate(*args)) < TOLERANCE[torch.float16][0]


def test_interior_tiles_compute_the_whole_region(emu):
    """A 40 x 40 gate: the 4 inner tiles' 16 x 16 regions lie wholly inside the map (all 256
    region pixels computed, every warp's 32), the border tiles' regions are clipped."""
    args = make_inputs(1, 8, 5, 80, 81, True, dtype=torch.float32)
    out = emulated_dfc_gate(emu, *args, channels_last=True)
    assert rel_err(out, plain_gate(*args)) < TOLERANCE[torch.float32][0]
