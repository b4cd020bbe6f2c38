"""ghostkernels.ghost_conv: every backend against a float64 F.conv2d + torch.cat computation,
gradients, custom-op registration, torch.compile, and the argument checks."""
import random
import re

import pytest
import torch
import torch.nn.functional as F

import ghostkernels
from ghostkernels import use_backend
from tests.backend_params import (ALL_BACKENDS, DTYPE_IDS, DTYPES, TOLERANCE,
                                  assert_compiled_matches_eager, backend_params, rel_err, require)

OP = "ghost_conv"

# (B, Cin, C1, H, W, channels_last, act_primary, act_cheap, out_channels or None for 2*C1)
CASES = {
    "nchw-relu-relu": (2, 5, 6, 4, 9, False, "relu", "relu", None),
    "cl-relu-none-odd-split": (1, 3, 7, 6, 5, True, "relu", "none", 11),
    "nchw-none-none-primary-only": (2, 4, 5, 3, 4, False, None, "none", 5),
    "cl-none-relu-1x1-image": (3, 6, 3, 1, 1, True, "none", "relu", 4),
    "nchw-cin17-odd": (1, 17, 4, 3, 7, False, "relu", "relu", 7),
}
CASE_NAMES = list(CASES) + ["random"]


def random_case(rng: random.Random, small: bool):
    """Channels 1..64 and H, W 1..33 (odd ones included); small for the Triton interpreter."""
    cmax, hmax, wmax = (20, 9, 17) if small else (64, 33, 33)
    C1 = rng.randint(1, cmax)
    return (rng.randint(1, 2 if small else 3), rng.randint(1, cmax), C1, rng.randint(1, hmax),
            rng.randint(1, wmax), rng.random() < 0.5, rng.choice(["relu", "none", None]),
            rng.choice(["relu", "none", None]), rng.randint(C1, 2 * C1))


def case(name, seed, backend="reference"):
    if name == "random":
        return random_case(random.Random(seed), small=backend == "triton")
    return CASES[name]


def make_inputs(B, Cin, C1, H, W, channels_last, *_, dtype=torch.float64, device="cpu"):
    x = torch.randn(B, Cin, H, W, dtype=dtype, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w_primary = torch.randn(C1, Cin, 1, 1, dtype=dtype, device=device) / Cin ** 0.5
    b_primary = 0.5 * torch.randn(C1, dtype=dtype, device=device)
    w_cheap = torch.randn(C1, 1, 3, 3, dtype=dtype, device=device) / 3
    b_cheap = 0.5 * torch.randn(C1, dtype=dtype, device=device)
    return x, w_primary, b_primary, w_cheap, b_cheap


def plain_ghost(x, w_primary, b_primary, w_cheap, b_cheap, act_primary, act_cheap, out_channels):
    """The definition with plain PyTorch convs in float64 on the CPU (no ghostkernels code)."""
    x, w_primary, b_primary, w_cheap, b_cheap = (
        t.double().cpu() if t is not None else None
        for t in (x, w_primary, b_primary, w_cheap, b_cheap))
    x1 = F.conv2d(x, w_primary, b_primary)
    x1 = F.relu(x1) if act_primary == "relu" else x1
    x2 = F.conv2d(x1, w_cheap, b_cheap, padding=1, groups=w_cheap.shape[0])
    x2 = F.relu(x2) if act_cheap == "relu" else x2
    return torch.cat([x1, x2], dim=1)[:, :out_channels or 2 * w_primary.shape[0]]


def expected_format(cfg):
    """channels_last output for channels_last x, unless x is also NCHW-contiguous (Cin = 1 or
    H*W = 1), where the layouts cannot be told apart and NCHW is used."""
    B, Cin, C1, H, W, channels_last, *_ = cfg
    if channels_last and Cin > 1 and H * W > 1:
        return torch.channels_last
    return torch.contiguous_format


def run(backend, x, w_primary, b_primary, w_cheap, b_cheap, act_p, act_c, out_channels):
    with use_backend(backend):
        return ghostkernels.ghost_conv(x, w_primary, b_primary, w_cheap, b_cheap, act_p, act_c,
                                       out_channels)


def test_reference_matches_plain_conv_and_cat():
    rng = random.Random(torch.initial_seed())
    for i in range(9):
        cfg = case("random", rng.randrange(2**31)) if i >= len(CASES) else list(CASES.values())[i]
        B, Cin, C1, H, W, cl, act_p, act_c, oc = cfg
        args = make_inputs(*cfg)
        out = run("reference", *args, act_p, act_c, oc)
        assert rel_err(out, plain_ghost(*args, act_p, act_c, oc)) < 1e-12, cfg
        assert out.is_contiguous(memory_format=expected_format(cfg)), cfg


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_forward_matches_definition(backend, dtype, name, _fresh_seed, poisoned_empty):
    device = require(backend, OP, dtype)
    cfg = case(name, _fresh_seed, backend)
    B, Cin, C1, H, W, cl, act_p, act_c, oc = cfg
    args = make_inputs(*cfg, dtype=dtype, device=device)
    out = run(backend, *args, act_p, act_c, oc)
    assert out.dtype == dtype and out.device.type == device
    assert out.shape == (B, oc or 2 * C1, H, W)
    assert out.is_contiguous(memory_format=expected_format(cfg)), (cfg, out.stride())
    assert torch.isfinite(out).all()
    assert rel_err(out, plain_ghost(*args, act_p, act_c, oc)) < TOLERANCE[dtype][0], cfg


@pytest.mark.parametrize("name", ["cl-relu-none-odd-split", "random"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradients_match_definition(backend, dtype, name, _fresh_seed):
    device = require(backend, OP, dtype)
    cfg = case(name, _fresh_seed, backend)
    B, Cin, C1, H, W, cl, act_p, act_c, oc = cfg
    args = make_inputs(*cfg, dtype=dtype, device=device)
    inputs = [t.detach().requires_grad_() for t in args]
    with use_backend(backend):  # the backward resolves its backend when it runs
        out = run(backend, *inputs, act_p, act_c, oc)
        # Positive: a bias gradient is a sum over pixels, and a zero-mean grad_out can make that sum
        # cancel to near zero, where a half-precision result has no relative accuracy left.
        grad_out = torch.rand(out.shape, dtype=torch.float64) + 0.5
        grads = torch.autograd.grad(out, inputs, grad_out.to(device=device, dtype=dtype))
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in args]
    ref_grads = torch.autograd.grad(plain_ghost(*ref_inputs, act_p, act_c, oc), ref_inputs,
                                    grad_out)
    names = ("x", "w_primary", "b_primary", "w_cheap", "b_cheap")
    for name_, g, r, t in zip(names, grads, ref_grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, name_
        assert rel_err(g, r) < TOLERANCE[dtype][1], (name_, cfg)


# Shapes that cross tile boundaries of the Triton kernel (16 channels, 8 rows, 32 columns) and
# of any other blocked kernel with such tiles; small enough for the Triton interpreter.
TILE_CASES = {
    "two-channel-blocks": (1, 2, 33, 3, 3, True, "relu", "relu", 61),
    "two-row-strips": (2, 3, 2, 11, 3, False, "relu", "none", None),
    "two-column-tiles": (1, 2, 3, 2, 35, True, "none", "relu", 5),
}


@pytest.mark.parametrize("name", list(TILE_CASES))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_forward_across_tile_boundaries(backend, name, poisoned_empty):
    device = require(backend, OP, torch.float32)
    cfg = TILE_CASES[name]
    *_, act_p, act_c, oc = cfg
    args = make_inputs(*cfg, dtype=torch.float32, device=device)
    out = run(backend, *args, act_p, act_c, oc)
    assert out.is_contiguous(memory_format=expected_format(cfg))
    assert rel_err(out, plain_ghost(*args, act_p, act_c, oc)) < TOLERANCE[torch.float32][0]


def test_sliced_cheap_channels_get_zero_gradients():
    args = make_inputs(*CASES["cl-relu-none-odd-split"])
    # positive primary biases: x1 alive (a seed once made both kept cheap channels' ReLUs dead
    # on all 30 pixels, which zeroes their gradients too); no ReLU on the cheap half
    args[2].abs_().add_(0.5)
    args = [t.requires_grad_() for t in args]
    run("reference", *args, "relu", "none", 9).sum().backward()  # C1 = 7: cheap 0, 1 kept
    w_cheap, b_cheap = args[3], args[4]
    assert (w_cheap.grad[2:] == 0).all() and (b_cheap.grad[2:] == 0).all()
    assert (w_cheap.grad[:2] != 0).any()


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_gradcheck_float64(backend):
    require(backend, OP, torch.float64)
    for cl, act_p, act_c, oc in ((False, "relu", "relu", None), (True, None, "relu", 7),
                                 (False, "relu", "none", 5)):
        inputs = [t.requires_grad_() for t in make_inputs(2, 3, 5, 4, 5, cl)]
        with use_backend(backend):
            assert torch.autograd.gradcheck(
                lambda *a: ghostkernels.ghost_conv(*a, act_p, act_c, oc), inputs, fast_mode=True)


def test_gradgradcheck_reference():
    inputs = [t.requires_grad_() for t in make_inputs(1, 2, 3, 3, 4, False)]
    with use_backend("reference"):
        assert torch.autograd.gradgradcheck(
            lambda *a: ghostkernels.ghost_conv(*a, "relu", "relu", 5), inputs, fast_mode=True)


def test_no_bias_means_zero_bias_and_2d_primary_weight():
    x, w_primary, _, w_cheap, _ = make_inputs(*CASES["nchw-relu-relu"])
    out = ghostkernels.ghost_conv(x, w_primary.flatten(1), None, w_cheap, None)
    zeros = torch.zeros(w_primary.shape[0], dtype=x.dtype)
    assert rel_err(out, plain_ghost(x, w_primary, zeros, w_cheap, zeros, "relu", "relu",
                                    None)) < 1e-12


@pytest.mark.parametrize("empty_dim", [0, 2, 3], ids=["B0", "H0", "W0"])
@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_gradients_of_empty_inputs_are_zero(backend, empty_dim):
    """An input with no pixels (B, H or W = 0) gives an empty output in the forward and zero
    gradients in the backward, for the Ghost op, the depthwise conv and their fusion (the backward
    of H = 0 or W = 0 ran a convolution that rejects it, after a forward that had succeeded)."""
    shape = [2, 3, 5, 6]
    shape[empty_dim] = 0
    x = torch.randn(shape, dtype=torch.float64)
    C1 = 4
    params = [torch.randn(C1, 3, 1, 1), torch.randn(C1), torch.randn(C1, 1, 3, 3),
              torch.randn(C1)]
    w_dw, b_dw, scale = torch.randn(7, 1, 3, 3), torch.randn(7), torch.rand(shape[0], 3)
    leaves = [t.double().requires_grad_() for t in (x, *params, w_dw, b_dw, scale)]
    x, w_primary, b_primary, w_cheap, b_cheap, w_dw, b_dw, scale = leaves
    # the fusion has no cpu kernel: forcing "cpu" there would raise BackendUnavailableError
    fused_backend = "reference" if backend == "cpu" else backend
    with use_backend(backend):
        outs = [ghostkernels.ghost_conv(x, w_primary, b_primary, w_cheap, b_cheap,
                                        out_channels=7, input_scale=scale),
                ghostkernels.depthwise_conv(x, w_dw[:3], b_dw[:3], 2, "relu")]
    with use_backend(fused_backend):
        outs.append(ghostkernels.ghost_conv_depthwise(
            x, w_primary, b_primary, w_cheap, b_cheap, w_dw, b_dw, out_channels=7,
            input_scale=scale))
    for out in outs:
        assert out.numel() == 0
        grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
        for leaf, grad in zip(leaves, grads):
            assert grad is None or (grad.shape == leaf.shape and not grad.any())


def test_non_contiguous_input_and_empty_batch():
    x, *params = make_inputs(*CASES["nchw-relu-relu"])
    x_strided = torch.stack([x, x], dim=-1)[..., 0]  # a strided view with the values of x
    assert not x_strided.is_contiguous()
    out = ghostkernels.ghost_conv(x_strided, *params)
    assert rel_err(out, plain_ghost(x, *params, "relu", "relu", None)) < 1e-12
    empty = ghostkernels.ghost_conv(x[:0], *params, out_channels=9)
    assert empty.shape == (0, 9, x.shape[2], x.shape[3])


@pytest.mark.parametrize("backend", backend_params("reference", "cpu", "triton"))
def test_opcheck(backend):
    dtype = torch.float64 if backend != "triton" else torch.float32
    device = require(backend, OP, dtype)
    x, w_primary, b_primary, w_cheap, b_cheap = make_inputs(1, 3, 4, 3, 5, True, dtype=dtype,
                                                            device=device)
    args = (x, w_primary.flatten(1), b_primary, w_cheap.reshape(4, 9), b_cheap)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.ghostkernels.ghost_conv.default,
                              (*[t.requires_grad_() for t in args], True, False, 7))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_torch_compile_fullgraph(channels_last):
    args = make_inputs(2, 4, 3, 5, 6, channels_last, dtype=torch.float32)

    def f(x, w_primary, b_primary, w_cheap, b_cheap):
        return ghostkernels.ghost_conv(x * 2.0, w_primary, b_primary, w_cheap, b_cheap, "relu",
                                       "none", 5).square().sum()

    assert_compiled_matches_eager(f, args)


def _bad(**changes):
    """(args, kwargs) of a valid call with some arguments replaced."""
    x, w_primary, b_primary, w_cheap, b_cheap = make_inputs(1, 4, 3, 5, 5, False,
                                                            dtype=torch.float32)
    call = dict(x=x, w_primary=w_primary, b_primary=b_primary, w_cheap=w_cheap, b_cheap=b_cheap)
    call.update(changes)
    return call


BAD_INPUTS = {
    "x-3d": (dict(x=torch.randn(4, 5, 5)), ValueError, "x must be a 4-d"),
    "x-int": (dict(x=torch.ones(1, 4, 5, 5, dtype=torch.int32)), TypeError, "x must have dtype"),
    "x-not-tensor": (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    "w_primary-cin": (dict(w_primary=torch.randn(3, 5, 1, 1)), ValueError, "w_primary"),
    "w_primary-3x3": (dict(w_primary=torch.randn(3, 4, 3, 3)), ValueError, "w_primary"),
    "w_primary-dtype": (dict(w_primary=torch.randn(3, 4, 1, 1, dtype=torch.float64)), TypeError,
                        "w_primary must have the dtype of x"),
    "w_cheap-5x5": (dict(w_cheap=torch.randn(3, 1, 5, 5)), ValueError, "w_cheap must have shape"),
    "w_cheap-channels": (dict(w_cheap=torch.randn(4, 1, 3, 3)), ValueError, "w_cheap"),
    "b_primary-shape": (dict(b_primary=torch.randn(4)), ValueError, "b_primary must have shape"),
    "b_cheap-dtype": (dict(b_cheap=torch.randn(3, dtype=torch.float16)), TypeError, "b_cheap"),
    "w_cheap-device": (dict(w_cheap=torch.randn(3, 1, 3, 3, device="meta")), ValueError,
                       "w_cheap must be on the device of x"),
    "act_primary": (dict(act_primary="gelu"), ValueError, "act_primary must be one of"),
    "act_cheap": (dict(act_cheap=True), ValueError, "act_cheap must be one of"),
    "out_channels-small": (dict(out_channels=2), ValueError, "out_channels must be in [C1, 2*C1] = [3, 6]"),
    "out_channels-large": (dict(out_channels=7), ValueError, "out_channels must be in [C1, 2*C1] = [3, 6]"),
    "out_channels-float": (dict(out_channels=4.0), TypeError, "out_channels must be an int"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(name):
    changes, error, message = BAD_INPUTS[name]
    with pytest.raises(error, match=re.escape(message)):
        ghostkernels.ghost_conv(**_bad(**changes))
