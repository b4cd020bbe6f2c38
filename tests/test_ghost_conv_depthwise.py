"""ghostkernels.ghost_conv_depthwise: every backend against a float64 composition of plain torch
ops (1x1 conv, depthwise 3x3, cat, nearest upsampling of the gate, strided k x k depthwise conv),
gradients, custom-op registration, torch.compile, decomposition and the argument checks."""
import random
import re

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import ghostkernels
from ghostkernels import use_backend
from tests.backend_params import (DTYPE_IDS, DTYPES, TOLERANCE, assert_compiled_matches_eager,
                                  backend_params, implemented_backends, rel_err, require)

OP = "ghost_conv_depthwise"
IMPLEMENTED_BACKENDS = implemented_backends(OP)

# (B, Cin, C1, out_channels, H, W, k, stride, channels_last, gate, input_scale)
CASES = {
    "k3-s2-odd-size": (2, 5, 6, 12, 9, 11, 3, 2, False, True, True),
    "k5-s2-odd-split-cl": (1, 6, 7, 10, 13, 10, 5, 2, True, True, False),
    "k3-s1-two-channel-blocks-cl": (1, 3, 20, 33, 13, 7, 3, 1, True, False, True),
    "k5-s1": (1, 4, 5, 10, 6, 6, 5, 1, False, True, True),
    "k1-s2-cl": (1, 3, 4, 8, 7, 7, 1, 2, True, True, False),
    "one-pixel": (2, 2, 3, 6, 1, 1, 3, 2, False, True, True),
    "one-row-cl": (1, 4, 4, 7, 1, 9, 5, 2, True, False, False),
    "several-tiles-cl": (1, 3, 18, 36, 31, 29, 3, 2, True, True, True),
}
CASE_NAMES = list(CASES) + ["random"]


def random_case(rng: random.Random, small: bool):
    C1 = rng.randint(1, 12 if small else 40)
    size = (1, 15) if small else (1, 33)
    return (rng.randint(1, 2), rng.randint(1, 8 if small else 40), C1, rng.randint(C1, 2 * C1),
            rng.randint(*size), rng.randint(*size), rng.choice((1, 3, 5)), rng.choice((1, 2)),
            rng.random() < 0.5, rng.random() < 0.7, rng.random() < 0.5)


def case(name, seed, backend="reference"):
    if name == "random":
        return random_case(random.Random(seed), small=backend == "triton")
    return CASES[name]


def make_inputs(B, Cin, C1, out, H, W, k, stride, channels_last, with_gate, with_scale,
                dtype=torch.float64, device="cpu"):
    """(x, w_primary, b_primary, w_cheap, b_cheap, w_dw, b_dw, input_scale, gate)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, dtype=torch.float64)).to(dtype=dtype, device=device)

    x = rand(B, Cin, H, W).contiguous(memory_format=fmt)
    gate = None
    if with_gate:
        gate = torch.rand(B, out, max(H // 2, 1), max(W // 2, 1), dtype=torch.float64)
        gate = gate.to(dtype=dtype, device=device).contiguous(memory_format=fmt)
    scale = (0.5 + torch.rand(B, Cin, dtype=torch.float64)).to(dtype=dtype, device=device) \
        if with_scale else None
    return (x, rand(C1, Cin, 1, 1, scale=Cin ** -0.5), rand(C1, scale=0.3),
            rand(C1, 1, 3, 3, scale=1 / 3), rand(C1, scale=0.3), rand(out, 1, k, k, scale=1 / k),
            rand(out, scale=0.3), scale, gate)


def plain(x, w_primary, b_primary, w_cheap, b_cheap, w_dw, b_dw, input_scale, gate, stride,
          act_dw=False):
    """The definition in plain PyTorch ops, float64 on the CPU (no ghostkernels code)."""
    x, w_primary, b_primary, w_cheap, b_cheap, w_dw, b_dw = (
        t.double().cpu() for t in (x, w_primary, b_primary, w_cheap, b_cheap, w_dw, b_dw))
    C1, out, k = w_primary.shape[0], w_dw.shape[0], w_dw.shape[-1]
    if input_scale is not None:
        x = x * input_scale.double().cpu()[:, :, None, None]
    x1 = F.relu(F.conv2d(x, w_primary, b_primary))
    x2 = F.relu(F.conv2d(x1, w_cheap, b_cheap, padding=1, groups=C1))
    g = torch.cat([x1, x2], 1)[:, :out]
    if gate is not None:
        g = g * F.interpolate(gate.double().cpu(), size=g.shape[-2:], mode="nearest")
    y = F.conv2d(g, w_dw, b_dw, stride=stride, padding=k // 2, groups=out)
    return F.relu(y) if act_dw else y


def run(backend, x, w_primary, b_primary, w_cheap, b_cheap, w_dw, b_dw, input_scale, gate, stride,
        act_dw="none"):
    with use_backend(backend):
        return ghostkernels.ghost_conv_depthwise(
            x, w_primary, b_primary, w_cheap, b_cheap, w_dw, b_dw, "relu", "relu", w_dw.shape[0],
            stride=stride, act_dw=act_dw, input_scale=input_scale, gate=gate)


def expected_shape(cfg):
    B, _, _, out, H, W, _, stride, *_ = cfg
    return (B, out, (H - 1) // stride + 1, (W - 1) // stride + 1)


def test_reference_matches_plain_composition():
    rng = random.Random(torch.initial_seed())
    for i in range(14):
        cfg = list(CASES.values())[i] if i < len(CASES) else random_case(rng, small=False)
        args = make_inputs(*cfg)
        for act in ("none", "relu"):
            out = run("reference", *args, cfg[7], act_dw=act)
            assert out.shape == expected_shape(cfg)
            assert rel_err(out, plain(*args, cfg[7], act == "relu")) < 1e-12, cfg


def test_equals_ghost_conv_then_depthwise_conv():
    """The op is exactly the two public ops in sequence (float64: no intermediate rounding)."""
    for cfg in (CASES["k5-s2-odd-split-cl"], CASES["several-tiles-cl"]):
        x, w1, b1, wc, bc, wd, bd, scale, gate = make_inputs(*cfg)
        g = ghostkernels.ghost_conv(x, w1, b1, wc, bc, "relu", "relu", wd.shape[0],
                                    input_scale=scale, gate=gate)
        expected = ghostkernels.depthwise_conv(g, wd, bd, stride=cfg[7], act="relu")
        out = run("reference", x, w1, b1, wc, bc, wd, bd, scale, gate, cfg[7], act_dw="relu")
        assert rel_err(out, expected) < 1e-13


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", IMPLEMENTED_BACKENDS)
def test_forward_matches_definition(backend, dtype, name, _fresh_seed, poisoned_empty):
    device = require(backend, OP, dtype)
    cfg = case(name, _fresh_seed, backend)
    args = make_inputs(*cfg, dtype=dtype, device=device)
    out = run(backend, *args, cfg[7])
    assert out.dtype == dtype and out.device.type == device
    assert out.shape == expected_shape(cfg)
    fmt = torch.channels_last if cfg[8] and cfg[1] > 1 else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), (cfg, out.stride())
    assert torch.isfinite(out).all()
    assert rel_err(out, plain(*args, cfg[7])) < TOLERANCE[dtype][0], cfg


def test_triton_small_regions_cross_many_tiles():
    """Regions of 8 x 8 x1 pixels (2 x 2 outputs per tile at k=3, stride 2; 1 x 1 at k=5): every
    tile border and halo path, against the definition."""
    device = require("triton", OP, torch.float32)
    from ghostkernels.triton import ghost_conv_depthwise as kernel
    config = kernel.LaunchConfig(region_h=8, region_w=8, num_warps=4)
    for cfg in ((2, 3, 5, 9, 11, 13, 3, 2, True, True, True),
                (1, 4, 3, 6, 9, 7, 5, 2, False, True, False)):
        x, w1, b1, wc, bc, wd, bd, scale, gate = make_inputs(*cfg, dtype=torch.float32,
                                                             device=device)
        C1, out, k = w1.shape[0], wd.shape[0], wd.shape[-1]
        y = kernel.forward(x, w1.reshape(C1, -1), b1, wc.reshape(C1, 9), bc,
                           wd.reshape(out, k * k), bd, k, cfg[7], True, True, True, out, scale,
                           gate, config=config)
        expected = plain(x, w1, b1, wc, bc, wd, bd, scale, gate, cfg[7], act_dw=True)
        assert rel_err(y, expected) < TOLERANCE[torch.float32][0], cfg
    with pytest.raises(ValueError, match="too small for a 5x5 depthwise conv: need >= 7"):
        kernel.forward(x, w1.reshape(C1, -1), b1, wc.reshape(C1, 9), bc, wd.reshape(out, 25), bd,
                       5, 2, True, True, False, out, config=kernel.LaunchConfig(region_h=4,
                                                                                region_w=16))


@pytest.mark.parametrize("name", ["k3-s2-odd-size", "k5-s2-odd-split-cl", "random"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", IMPLEMENTED_BACKENDS)
def test_gradients_match_definition(backend, dtype, name, _fresh_seed):
    device = require(backend, OP, dtype)
    cfg = case(name, _fresh_seed, backend)
    args = make_inputs(*cfg, dtype=dtype, device=device)
    inputs = [None if t is None else t.detach().requires_grad_() for t in args]
    out = run(backend, *inputs, cfg[7])
    # the reference gets the same (rounded) output gradient: a bias gradient is a sum over the
    # output that can cancel to a value far below its terms, where rounding grad_out alone to
    # bf16 once put a 6-element gradient 8 % off (seed 191142532)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(device=device, dtype=dtype)
    present = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(out, present, grad_out)
    ref_inputs = [None if t is None else t.detach().double().cpu().requires_grad_()
                  for t in args]
    ref_present = [t for t in ref_inputs if t is not None]
    ref_grads = torch.autograd.grad(plain(*ref_inputs, cfg[7]), ref_present,
                                    grad_out.double().cpu())
    for g, r, t in zip(grads, ref_grads, present):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert rel_err(g, r) < TOLERANCE[dtype][1], (cfg, tuple(t.shape))


def test_gradient_of_only_some_inputs_and_gradcheck():
    args = make_inputs(*CASES["k3-s2-odd-size"])
    w_dw = args[5].detach().requires_grad_()
    out = run("reference", *args[:5], w_dw, *args[6:], 2)
    (g,) = torch.autograd.grad(out.sum(), [w_dw])
    ref_w_dw = args[5].detach().requires_grad_()
    (r,) = torch.autograd.grad(plain(*args[:5], ref_w_dw, *args[6:], 2).sum(), [ref_w_dw])
    assert rel_err(g, r) < 1e-12
    for cfg in ((1, 3, 2, 4, 5, 6, 3, 2, True, True, True), (2, 2, 3, 5, 4, 3, 5, 1, False,
                                                               True, False)):
        inputs = [None if t is None else t.requires_grad_() for t in make_inputs(*cfg)]
        with use_backend("reference"):
            assert torch.autograd.gradcheck(
                lambda *a: run("reference", *a, cfg[7]), inputs, fast_mode=True)


def test_no_biases_non_contiguous_input_and_empty_batch():
    x, w1, _, wc, _, wd, _, scale, gate = make_inputs(*CASES["k3-s2-odd-size"])
    x_strided = torch.stack([x, x], dim=-1)[..., 0]
    assert not x_strided.is_contiguous()
    out = ghostkernels.ghost_conv_depthwise(x_strided, w1.flatten(1), None, wc, None, wd, None,
                                            input_scale=scale, gate=gate)
    zeros = [torch.zeros(n, dtype=torch.float64) for n in (6, 6, 12)]
    assert rel_err(out, plain(x, w1, zeros[0], wc, zeros[1], wd, zeros[2], scale, gate, 2)) < 1e-12
    empty = ghostkernels.ghost_conv_depthwise(x[:0], w1, None, wc, None, wd, None)
    assert empty.shape == (0, 12, 5, 6)


@pytest.mark.parametrize("backend", backend_params("reference", "triton"))
def test_opcheck(backend):
    dtype = torch.float64 if backend != "triton" else torch.float32
    device = require(backend, OP, dtype)
    x, w1, b1, wc, bc, wd, bd, scale, gate = make_inputs(1, 3, 4, 7, 6, 5, 3, 2, True, True, True,
                                                         dtype=dtype, device=device)
    args = (x, w1.flatten(1), b1, wc.reshape(4, 9), bc, wd.reshape(7, 9), bd, 3, 2, True, True,
            False, 7, scale, gate)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.ghostkernels.ghost_conv_depthwise.default,
                              tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a
                                    for a in args))


def test_torch_compile_fullgraph():
    x, w1, b1, wc, bc, wd, bd, scale, gate = make_inputs(2, 4, 5, 9, 9, 8, 5, 2, True, True, True,
                                                         dtype=torch.float32)

    def f(x, w1, b1, wc, bc, wd, bd, scale, gate):
        return ghostkernels.ghost_conv_depthwise(x * 2.0, w1, b1, wc, bc, wd, bd, "relu", "none",
                                                 9, input_scale=scale, gate=gate).square().sum()

    assert_compiled_matches_eager(f, [x, w1, b1, wc, bc, wd, bd, scale, gate])


def test_decomposes_to_plain_ops():
    x, w1, b1, wc, bc, wd, bd, scale, gate = make_inputs(*CASES["k3-s2-odd-size"],
                                                         dtype=torch.float32)

    def f(x, w1, b1, wc, bc, wd, bd, scale, gate):
        return ghostkernels.ghost_conv_depthwise(x, w1, b1, wc, bc, wd, bd, input_scale=scale,
                                                 gate=gate)

    args = (x, w1, b1, wc, bc, wd, bd, scale, gate)
    with ghostkernels.decomposed():
        graph = make_fx(f)(*args)
    ops = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert any("convolution" in op for op in ops), ops
    assert not any("ghostkernels" in op for op in ops), ops
    assert rel_err(graph(*args), f(*args)) < 1e-6


BAD_INPUTS = {
    "w_dw-kernel-7": (dict(w_dw=torch.randn(12, 1, 7, 7)), ValueError,
                      "w_dw must have shape [out_channels, 1, k, k] with out_channels = 12 and "
                      "k in (1, 3, 5), got (12, 1, 7, 7)"),
    "w_dw-channels": (dict(w_dw=torch.randn(10, 1, 3, 3)), ValueError,
                      "w_dw must have shape [out_channels, 1, k, k] with out_channels = 12"),
    "w_dw-not-square": (dict(w_dw=torch.randn(12, 1, 3, 5)), ValueError,
                        "got (12, 1, 3, 5)"),
    "w_dw-3d": (dict(w_dw=torch.randn(12, 3, 3)), ValueError, "w_dw must be a 4-d"),
    "w_dw-dtype": (dict(w_dw=torch.randn(12, 1, 3, 3, dtype=torch.float64)), TypeError,
                   "w_dw must have the dtype of x"),
    "b_dw-shape": (dict(b_dw=torch.randn(6)), ValueError, "b_dw must have shape [12]"),
    "stride-3": (dict(stride=3), ValueError, "stride must be one of (1, 2), got 3"),
    "stride-bool": (dict(stride=True), ValueError, "stride must be one of (1, 2), got True"),
    "act_dw": (dict(act_dw="gelu"), ValueError, "act_dw must be one of ('relu', 'none')"),
    "w_cheap-5x5": (dict(w_cheap=torch.randn(6, 1, 5, 5)), ValueError,
                    "w_cheap must have shape [C1, 1, 3, 3]"),
    "gate-channels": (dict(gate=torch.rand(1, 6, 3, 3)), ValueError,
                      "gate must have shape [B, out_channels, Hg, Wg] = [1, 12"),
    "x-3d": (dict(x=torch.randn(5, 6, 6)), ValueError, "x must be a 4-d"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(name):
    changes, error, message = BAD_INPUTS[name]
    x, w1, b1, wc, bc, wd, bd, _, _ = make_inputs(1, 5, 6, 12, 6, 6, 3, 2, False, False, False,
                                                  dtype=torch.float32)
    call = dict(x=x, w_primary=w1, b_primary=b1, w_cheap=wc, b_cheap=bc, w_dw=wd, b_dw=bd)
    call.update(changes)
    with pytest.raises(error, match=re.escape(message)):
        ghostkernels.ghost_conv_depthwise(**call)
