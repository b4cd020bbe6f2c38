"""ghostkernels.depthwise_conv: every backend against a float64 F.conv2d computation, gradients,
custom-op registration, torch.compile, and the argument checks."""
import random
import re

import pytest
import torch
import torch.nn.functional as F

import ghostkernels
from ghostkernels import use_backend
from tests.backend_params import (ALL_BACKENDS, DTYPE_IDS, DTYPES, TOLERANCE,
                                  assert_compiled_matches_eager, backend_params, rel_err, require)

OP = "depthwise_conv"

# (B, C, H, W, kh, kw, stride, channels_last, act)
CASES = {
    "3x3-s1-nchw-relu": (2, 5, 6, 7, 3, 3, 1, False, "relu"),
    "5x5-s2-cl-none": (1, 7, 9, 8, 5, 5, 2, True, "none"),
    "1x5-s1-cl-dfc": (2, 3, 4, 9, 1, 5, 1, True, None),
    "5x1-s2-nchw-odd": (1, 9, 7, 3, 5, 1, 2, False, "relu"),
    "1x1-s2-nchw": (1, 4, 5, 5, 1, 1, 2, False, "none"),
    "5x5-on-1x1-image": (3, 2, 1, 1, 5, 5, 2, True, "none"),
}
CASE_NAMES = list(CASES) + ["random"]


def random_case(rng: random.Random, small: bool):
    """Channels 1..64 and H, W 1..33 (odd ones included); small for the Triton interpreter."""
    cmax, smax = (12, 12) if small else (64, 33)
    return (rng.randint(1, 2 if small else 3), rng.randint(1, cmax), rng.randint(1, smax),
            rng.randint(1, smax), rng.choice([1, 3, 5]), rng.choice([1, 3, 5]),
            rng.choice([1, 2]), rng.random() < 0.5, rng.choice(["relu", "none"]))


def case(name, seed, backend="reference"):
    if name == "random":
        return random_case(random.Random(seed), small=backend == "triton")
    return CASES[name]


def make_inputs(B, C, H, W, kh, kw, stride, channels_last, act, dtype=torch.float64,
                device="cpu"):
    x = torch.randn(B, C, H, W, dtype=dtype, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(C, 1, kh, kw, dtype=dtype, device=device) / (kh * kw) ** 0.5
    bias = 0.5 * torch.randn(C, dtype=dtype, device=device)
    return x, weight, bias


def plain_depthwise(x, weight, bias, stride, act):
    """The definition with a plain PyTorch conv in float64 on the CPU (no ghostkernels code)."""
    x, weight = x.double().cpu(), weight.double().cpu()
    bias = bias.double().cpu() if bias is not None else None
    kh, kw = weight.shape[2:]
    y = F.conv2d(x, weight, bias, stride=stride, padding=(kh // 2, kw // 2), groups=x.shape[1])
    return F.relu(y) if act == "relu" else y


def expected_format(cfg):
    B, C, H, W, *_, channels_last, _ = cfg
    return torch.channels_last if channels_last and C > 1 and H * W > 1 else \
        torch.contiguous_format


def run(backend, x, weight, bias, stride, act):
    with use_backend(backend):
        return ghostkernels.depthwise_conv(x, weight, bias, stride, act)


def test_reference_matches_plain_conv():
    rng = random.Random(torch.initial_seed())
    for i in range(10):
        cfg = case("random", rng.randrange(2**31)) if i >= len(CASES) else list(CASES.values())[i]
        *_, stride, cl, act = cfg
        x, weight, bias = make_inputs(*cfg)
        out = run("reference", x, weight, bias, stride, act)
        assert rel_err(out, plain_depthwise(x, weight, bias, stride, act)) < 1e-12, cfg
        assert out.is_contiguous(memory_format=expected_format(cfg)), cfg


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_forward_matches_definition(backend, dtype, name, _fresh_seed, poisoned_empty):
    device = require(backend, OP, dtype)
    cfg = case(name, _fresh_seed, backend)
    B, C, H, W, kh, kw, stride, cl, act = cfg
    x, weight, bias = make_inputs(*cfg, dtype=dtype, device=device)
    out = run(backend, x, weight, bias, stride, act)
    assert out.dtype == dtype and out.device.type == device
    assert out.shape == (B, C, (H - 1) // stride + 1, (W - 1) // stride + 1)
    assert out.is_contiguous(memory_format=expected_format(cfg)), (cfg, out.stride())
    assert torch.isfinite(out).all()
    ref = plain_depthwise(x, weight, bias, stride, act)
    assert rel_err(out, ref) < TOLERANCE[dtype][0], cfg


# Each crosses one tile boundary of the Triton kernel (8 channels / 32 columns in NCHW,
# 64 channels / 8 columns in channels_last) and stays small for the Triton interpreter.
TILE_CASES = {
    "nchw-two-channel-blocks-wide": (1, 9, 3, 40, 3, 3, 1, False, "relu"),
    "cl-two-channel-blocks": (1, 65, 2, 3, 3, 3, 1, True, "none"),
    "cl-column-and-row-tiles": (2, 3, 9, 18, 3, 5, 1, True, "relu"),
}


@pytest.mark.parametrize("name", list(TILE_CASES))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_forward_across_tile_boundaries(backend, name, poisoned_empty):
    device = require(backend, OP, torch.float32)
    cfg = TILE_CASES[name]
    *_, stride, cl, act = cfg
    x, weight, bias = make_inputs(*cfg, dtype=torch.float32, device=device)
    out = run(backend, x, weight, bias, stride, act)
    assert out.is_contiguous(memory_format=expected_format(cfg))
    ref = plain_depthwise(x, weight, bias, stride, act)
    assert rel_err(out, ref) < TOLERANCE[torch.float32][0]


@pytest.mark.parametrize("name", ["5x5-s2-cl-none", "3x3-s1-nchw-relu", "random"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradients_match_definition(backend, dtype, name, _fresh_seed):
    device = require(backend, OP, dtype)
    cfg = case(name, _fresh_seed, backend)
    *_, stride, cl, act = cfg
    args = make_inputs(*cfg, dtype=dtype, device=device)
    inputs = [t.detach().requires_grad_() for t in args]
    with use_backend(backend):  # the backward resolves its backend when it runs
        out = run(backend, *inputs, stride, act)
        # Positive: a bias gradient is a sum over pixels, and a zero-mean grad_out can make that sum
        # cancel to near zero, where a half-precision result has no relative accuracy left.
        grad_out = torch.rand(out.shape, dtype=torch.float64) + 0.5
        grads = torch.autograd.grad(out, inputs, grad_out.to(device=device, dtype=dtype))
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in args]
    ref_grads = torch.autograd.grad(plain_depthwise(*ref_inputs, stride, act), ref_inputs,
                                    grad_out)
    for name_, g, r, t in zip(("x", "weight", "bias"), grads, ref_grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, name_
        assert rel_err(g, r) < TOLERANCE[dtype][1], (name_, cfg)


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_gradcheck_float64(backend):
    require(backend, OP, torch.float64)
    for cfg in ((2, 3, 5, 4, 3, 3, 1, True, "relu"), (1, 2, 5, 6, 5, 1, 2, False, "none"),
                (1, 3, 4, 5, 1, 5, 2, True, "relu")):
        *_, stride, cl, act = cfg
        inputs = [t.requires_grad_() for t in make_inputs(*cfg)]
        with use_backend(backend):
            assert torch.autograd.gradcheck(
                lambda *a: ghostkernels.depthwise_conv(*a, stride, act), inputs, fast_mode=True)


def test_no_bias_non_contiguous_input_and_empty_batch():
    x, weight, _ = make_inputs(*CASES["3x3-s1-nchw-relu"])
    x_strided = torch.stack([x, x], dim=-1)[..., 0]  # a strided view with the values of x
    assert not x_strided.is_contiguous()
    out = ghostkernels.depthwise_conv(x_strided, weight, None, 2, "relu")
    assert rel_err(out, plain_depthwise(x, weight, None, 2, "relu")) < 1e-12
    empty = ghostkernels.depthwise_conv(x[:0], weight, None, 2)
    assert empty.shape == (0, x.shape[1], 3, 4)


@pytest.mark.parametrize("backend", backend_params("reference", "cpu", "triton"))
def test_opcheck(backend):
    dtype = torch.float64 if backend != "triton" else torch.float32
    device = require(backend, OP, dtype)
    x, weight, bias = make_inputs(1, 3, 5, 4, 3, 5, 2, True, "relu", dtype=dtype, device=device)
    args = (x, weight.reshape(3, 15), bias)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.ghostkernels.depthwise_conv.default,
                              (*[t.requires_grad_() for t in args], 3, 5, 2, True))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_torch_compile_fullgraph(channels_last):
    x, weight, bias = make_inputs(2, 4, 7, 6, 3, 3, 2, channels_last, "relu", dtype=torch.float32)

    def f(x, weight, bias):
        return ghostkernels.depthwise_conv(x * 2.0, weight, bias, 2, "relu").square().sum()

    assert_compiled_matches_eager(f, (x, weight, bias))


BAD_INPUTS = {
    "x-3d": (dict(x=torch.randn(4, 5, 5)), ValueError, "x must be a 4-d"),
    "x-int": (dict(x=torch.ones(1, 4, 5, 5, dtype=torch.int64)), TypeError, "x must have dtype"),
    "weight-channels": (dict(weight=torch.randn(3, 1, 3, 3)), ValueError,
                        "weight must have shape [C, 1, kh, kw] with C = 4"),
    "weight-7x7": (dict(weight=torch.randn(4, 1, 7, 7)), ValueError, "kh, kw in (1, 3, 5)"),
    "weight-even": (dict(weight=torch.randn(4, 1, 3, 2)), ValueError, "kh, kw in (1, 3, 5)"),
    "weight-grouped": (dict(weight=torch.randn(4, 2, 3, 3)), ValueError, "weight must have shape"),
    "weight-2d": (dict(weight=torch.randn(4, 9)), ValueError, "weight must be a 4-d"),
    "weight-dtype": (dict(weight=torch.randn(4, 1, 3, 3, dtype=torch.float16)), TypeError,
                     "weight must have the dtype of x"),
    "weight-device": (dict(weight=torch.randn(4, 1, 3, 3, device="meta")), ValueError,
                      "weight must be on the device of x"),
    "bias-shape": (dict(bias=torch.randn(5)), ValueError, "bias must have shape [4]"),
    "stride-3": (dict(stride=3), ValueError, "stride must be one of (1, 2)"),
    "stride-tuple": (dict(stride=(2, 2)), ValueError, "stride must be one of (1, 2)"),
    "act": (dict(act="sigmoid"), ValueError, "act must be one of"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(name):
    changes, error, message = BAD_INPUTS[name]
    x, weight, bias = make_inputs(1, 4, 5, 5, 3, 3, 1, False, "relu", dtype=torch.float32)
    call = dict(x=x, weight=weight, bias=bias)
    call.update(changes)
    with pytest.raises(error, match=re.escape(message)):
        ghostkernels.depthwise_conv(**call)
