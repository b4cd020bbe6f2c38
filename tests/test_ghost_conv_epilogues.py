"""ghostkernels.ghost_conv's fused extras (input_scale, gate, residual): every backend against a
float64 F.conv2d + torch.cat + F.interpolate computation, gradients (gradcheck in float64 and
across backends), custom-op registration, torch.compile, and the argument checks."""
import random
import re

import pytest
import torch
import torch.nn.functional as F

import ghostkernels
from ghostkernels import use_backend
from tests.backend_params import (ALL_BACKENDS, TOLERANCE, assert_compiled_matches_eager,
                                  backend_params, require)
from tests.test_ghost_conv import (DTYPE_IDS, DTYPES, expected_format, make_inputs,
                                   plain_ghost, rel_err)

OP = "ghost_conv"
EXTRAS = ("input_scale", "gate", "residual")

# (B, Cin, C1, H, W, channels_last, act_primary, act_cheap, out_channels or None, extras,
#  gate (Hg, Wg) or None)
CASES = {
    "scale-nchw": (2, 5, 6, 4, 9, False, "relu", "relu", None, ("input_scale",), None),
    "gate-cl-half-res-odd": (1, 3, 7, 7, 5, True, "relu", "none", 11, ("gate",), (3, 2)),
    "residual-nchw-no-act": (2, 4, 5, 3, 4, False, None, None, 5, ("residual",), None),
    "all-cl": (1, 6, 3, 5, 6, True, "relu", "relu", None, EXTRAS, (2, 3)),
    "gate-1x1-and-larger-than-y": (2, 2, 4, 3, 1, False, "relu", "relu", 6, EXTRAS, (5, 1)),
}
CASE_NAMES = list(CASES) + ["random"]


def random_case(rng: random.Random, small: bool):
    """Sizes up to 21, where F.interpolate's float32 index rule (the independent definition used
    here) equals the op's exact integer rule for every gate size (see nearest_indices)."""
    cmax, hmax, wmax = (12, 9, 17) if small else (40, 21, 21)
    C1, H, W = rng.randint(1, cmax), rng.randint(1, hmax), rng.randint(1, wmax)
    extras = tuple(e for e in EXTRAS if rng.random() < 0.7) or ("gate",)
    return (rng.randint(1, 2), rng.randint(1, cmax), C1, H, W, rng.random() < 0.5,
            rng.choice(["relu", None]), rng.choice(["relu", None]), rng.randint(C1, 2 * C1),
            extras, (rng.randint(1, H + 2), rng.randint(1, W + 2)))


def case(name, seed, backend="reference"):
    if name == "random":
        return random_case(random.Random(seed), small=backend == "triton")
    return CASES[name]


def make_extras(cfg, dtype=torch.float64, device="cpu"):
    """{name: tensor} of the case's extras: an SE-like scale in (0, 1.5), a sigmoid-like gate,
    a normal residual; gate/residual in a random layout (the op must accept either)."""
    B, Cin, C1, H, W, channels_last, *_, oc, extras, gate_hw = cfg
    oc = oc or 2 * C1
    out = {}
    if "input_scale" in extras:
        out["input_scale"] = 1.5 * torch.rand(B, Cin, dtype=dtype, device=device)
    if "gate" in extras:
        out["gate"] = torch.rand(B, oc, *gate_hw, dtype=dtype, device=device)
    if "residual" in extras:
        out["residual"] = torch.randn(B, oc, H, W, dtype=dtype, device=device)
    for name in ("gate", "residual"):
        if name in out and random.random() < 0.5:
            out[name] = out[name].to(memory_format=torch.channels_last)
    return out


def plain_ghost_extras(args, act_p, act_c, oc, input_scale=None, gate=None, residual=None):
    """The definition in float64 on the CPU with plain PyTorch ops (no ghostkernels code)."""
    x, *params = args
    x = x.double().cpu()
    if input_scale is not None:
        x = x * input_scale.double().cpu()[:, :, None, None]
    y = plain_ghost(x, *params, act_p, act_c, oc)
    if gate is not None:
        y = y * F.interpolate(gate.double().cpu(), size=y.shape[-2:], mode="nearest")
    if residual is not None:
        y = y + residual.double().cpu()
    return y


def run(backend, args, act_p, act_c, oc, extras):
    with use_backend(backend):
        return ghostkernels.ghost_conv(*args, act_p, act_c, oc, **extras)


def test_reference_matches_plain_ops_and_interpolate_rule():
    rng = random.Random(torch.initial_seed())
    configs = list(CASES.values()) + [random_case(rng, small=False) for _ in range(4)]
    for cfg in configs:
        *_, act_p, act_c, oc, _, _ = cfg
        args, extras = make_inputs(*cfg), make_extras(cfg)
        out = run("reference", args, act_p, act_c, oc, extras)
        assert rel_err(out, plain_ghost_extras(args, act_p, act_c, oc, **extras)) < 1e-12, cfg
        assert out.is_contiguous(memory_format=expected_format(cfg)), cfg


def test_gate_index_rule_is_interpolate_nearest_for_dfc_sizes():
    """The DFC gate is the 2x2-average-pooled map: Hg = H // 2. Odd and even sizes alike, the
    integer rule floor(h * Hg / H) picks the rows F.interpolate(mode="nearest") picks."""
    for size in range(2, 700):
        low = size // 2
        source = torch.arange(low, dtype=torch.float64).view(1, 1, low, 1)
        picked = F.interpolate(source, size=(size, 1), mode="nearest").view(-1).long()
        assert torch.equal(picked, torch.arange(size) * low // size), size


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_forward_matches_definition(backend, dtype, name, _fresh_seed, poisoned_empty):
    device = require(backend, OP, dtype)
    cfg = case(name, _fresh_seed, backend)
    B, Cin, C1, H, W, cl, act_p, act_c, oc, *_ = cfg
    args, extras = make_inputs(*cfg, dtype=dtype, device=device), make_extras(cfg, dtype, device)
    out = run(backend, args, act_p, act_c, oc, extras)
    assert out.dtype == dtype and out.device.type == device
    assert out.shape == (B, oc or 2 * C1, H, W)
    assert out.is_contiguous(memory_format=expected_format(cfg)), (cfg, out.stride())
    assert torch.isfinite(out).all()
    expected = plain_ghost_extras(args, act_p, act_c, oc, **extras)
    assert rel_err(out, expected) < TOLERANCE[dtype][0], cfg


@pytest.mark.parametrize("name", ["all-cl", "random"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradients_match_definition(backend, dtype, name, _fresh_seed):
    device = require(backend, OP, dtype)
    cfg = case(name, _fresh_seed, backend)
    *_, act_p, act_c, oc, _, _ = cfg
    args, extras = make_inputs(*cfg, dtype=dtype, device=device), make_extras(cfg, dtype, device)
    names = ["x", "w_primary", "b_primary", "w_cheap", "b_cheap", *extras]
    inputs = [t.detach().requires_grad_() for t in [*args, *extras.values()]]
    with use_backend(backend):  # the backward recomputes the core output on this backend too
        out = ghostkernels.ghost_conv(*inputs[:5], act_p, act_c, oc,
                                      **dict(zip(extras, inputs[5:])))
        # Positive: a bias gradient is a sum over pixels, and a zero-mean grad_out can make that sum
        # cancel to near zero, where a half-precision result has no relative accuracy left.
        grad_out = torch.rand(out.shape, dtype=torch.float64) + 0.5
        grads = torch.autograd.grad(out, inputs, grad_out.to(device=device, dtype=dtype))
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in inputs]
    ref = plain_ghost_extras(ref_inputs[:5], act_p, act_c, oc, **dict(zip(extras, ref_inputs[5:])))
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out)
    for name_, g, r, t in zip(names, grads, ref_grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, name_
        assert rel_err(g, r) < TOLERANCE[dtype][1], (name_, cfg)


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("wanted", ["w_primary", "b_cheap", "gate", "residual"])
def test_gradient_of_one_input_with_input_scale(wanted, backend):
    """With input_scale given, a gradient of a parameter or epilogue alone (neither x nor the
    scale requires grad, as for frozen features) is the one of the definition (the backward
    crashed on the missing gradient of the scaled input)."""
    require(backend, OP, torch.float64)
    cfg = (2, 3, 4, 4, 5, False, "relu", "relu", 7, EXTRAS, (2, 3))
    args, extras = make_inputs(*cfg), make_extras(cfg)
    tensors = dict(zip(["x", "w_primary", "b_primary", "w_cheap", "b_cheap"], args), **extras)
    tensors[wanted] = tensors[wanted].detach().requires_grad_()
    t = list(tensors.values())
    with use_backend(backend):
        out = ghostkernels.ghost_conv(*t[:5], "relu", "relu", 7, **dict(zip(extras, t[5:])))
        (grad,) = torch.autograd.grad(out.square().sum(), tensors[wanted])
    ref_t = {k: v.detach().requires_grad_(k == wanted) for k, v in tensors.items()}
    r = list(ref_t.values())
    ref = plain_ghost_extras(r[:5], "relu", "relu", 7, **dict(zip(extras, r[5:])))
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), ref_t[wanted])
    assert rel_err(grad, ref_grad) < 1e-10


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_gradcheck_float64(backend):
    require(backend, OP, torch.float64)
    for extras, cl, act_p, act_c, oc in (
            (("input_scale",), False, "relu", "relu", None), (("gate",), True, "relu", None, 7),
            (("residual",), False, None, None, 5), (EXTRAS, True, "relu", "relu", 8)):
        cfg = (2, 3, 5, 4, 5, cl, act_p, act_c, oc, extras, (2, 3))
        given = make_extras(cfg)
        inputs = [t.requires_grad_() for t in [*make_inputs(*cfg), *given.values()]]

        def f(*a):
            return ghostkernels.ghost_conv(*a[:5], act_p, act_c, oc, **dict(zip(given, a[5:])))

        with use_backend(backend):
            assert torch.autograd.gradcheck(f, inputs, fast_mode=True), extras


def test_gradgradcheck_reference():
    cfg = (1, 2, 3, 3, 4, False, "relu", "relu", 5, EXTRAS, (2, 2))
    given = make_extras(cfg)
    inputs = [t.requires_grad_() for t in [*make_inputs(*cfg), *given.values()]]
    with use_backend("reference"):
        assert torch.autograd.gradgradcheck(
            lambda *a: ghostkernels.ghost_conv(*a[:5], "relu", "relu", 5,
                                               **dict(zip(given, a[5:]))), inputs, fast_mode=True)


@pytest.mark.parametrize("backend", backend_params("reference", "cpu", "triton"))
def test_opcheck(backend):
    dtype = torch.float64 if backend != "triton" else torch.float32
    device = require(backend, OP, dtype)
    cfg = (1, 3, 4, 3, 5, True, "relu", None, 7, EXTRAS, (2, 2))
    x, w_primary, b_primary, w_cheap, b_cheap = make_inputs(*cfg, dtype=dtype, device=device)
    extras = make_extras(cfg, dtype, device)
    args = (x, w_primary.flatten(1), b_primary, w_cheap.reshape(4, 9), b_cheap)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.ghostkernels.ghost_conv.default,
                              (*[t.requires_grad_() for t in args], True, False, 7,
                               *[extras[n].requires_grad_() for n in EXTRAS]))


def test_torch_compile_fullgraph():
    cfg = (2, 4, 3, 5, 6, True, "relu", None, 5, EXTRAS, (2, 3))
    args, extras = make_inputs(*cfg, dtype=torch.float32), make_extras(cfg, torch.float32)
    tensors = [*args, *extras.values()]

    def f(x, w_primary, b_primary, w_cheap, b_cheap, input_scale, gate, residual):
        return ghostkernels.ghost_conv(x * 2.0, w_primary, b_primary, w_cheap, b_cheap, "relu",
                                       "none", 5, input_scale=input_scale.sigmoid(), gate=gate,
                                       residual=residual).square().sum()

    assert_compiled_matches_eager(f, tensors)


def test_empty_batch_with_extras():
    cfg = (2, 3, 4, 5, 6, True, "relu", "relu", 7, EXTRAS, (2, 3))
    args, extras = make_inputs(*cfg), make_extras(cfg)
    out = ghostkernels.ghost_conv(args[0][:0], *args[1:], out_channels=7,
                                  **{k: v[:0] for k, v in extras.items()})
    assert out.shape == (0, 7, 5, 6)


def test_extras_are_keyword_only():
    args = make_inputs(1, 2, 3, 3, 3, False)
    with pytest.raises(TypeError):
        ghostkernels.ghost_conv(*args, "relu", "relu", 6, torch.rand(1, 2))


def _bad(**changes):
    """kwargs of a valid call (B=1, Cin=4, C1=3, out_channels 6, 5x5) with some replaced."""
    x, w_primary, b_primary, w_cheap, b_cheap = make_inputs(1, 4, 3, 5, 5, False,
                                                            dtype=torch.float32)
    call = dict(x=x, w_primary=w_primary, b_primary=b_primary, w_cheap=w_cheap, b_cheap=b_cheap,
                input_scale=torch.rand(1, 4), gate=torch.rand(1, 6, 2, 2),
                residual=torch.randn(1, 6, 5, 5))
    call.update(changes)
    return call


BAD_INPUTS = {
    "input_scale-list": (dict(input_scale=[1.0]), TypeError, "input_scale must be a torch.Tensor"),
    "input_scale-shape": (dict(input_scale=torch.rand(1, 4, 1, 1)), ValueError,
                          "input_scale must have shape [B, Cin] = [1, 4]"),
    "input_scale-dtype": (dict(input_scale=torch.rand(1, 4, dtype=torch.float64)), TypeError,
                          "input_scale must have the dtype of x (float32), got float64"),
    "input_scale-device": (dict(input_scale=torch.rand(1, 4, device="meta")), ValueError,
                           "input_scale must be on the device of x"),
    "gate-channels": (dict(gate=torch.rand(1, 3, 2, 2)), ValueError,
                      "gate must have shape [B, out_channels, Hg, Wg] = [1, 6, Hg >= 1, Wg >= 1]"),
    "gate-3d": (dict(gate=torch.rand(1, 6, 2)), ValueError, "gate must have shape"),
    "gate-empty": (dict(gate=torch.rand(1, 6, 0, 2)), ValueError, "gate must have shape"),
    "gate-dtype": (dict(gate=torch.rand(1, 6, 2, 2, dtype=torch.float16)), TypeError,
                   "gate must have the dtype of x"),
    "gate-device": (dict(gate=torch.rand(1, 6, 2, 2, device="meta")), ValueError,
                    "gate must be on the device of x"),
    "residual-shape": (dict(residual=torch.randn(1, 6, 5, 4)), ValueError,
                       "residual must have the output's shape [B, out_channels, H, W] = "
                       "[1, 6, 5, 5], got (1, 6, 5, 4)"),
    "residual-sliced-channels": (dict(residual=torch.randn(1, 5, 5, 5)), ValueError,
                                 "residual must have the output's shape"),
    "residual-dtype": (dict(residual=torch.randn(1, 6, 5, 5, dtype=torch.float64)), TypeError,
                       "residual must have the dtype of x"),
    "residual-device": (dict(residual=torch.randn(1, 6, 5, 5, device="meta")), ValueError,
                        "residual must be on the device of x"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(name):
    changes, error, message = BAD_INPUTS[name]
    with pytest.raises(error, match=re.escape(message)):
        ghostkernels.ghost_conv(**_bad(**changes))


# GhostNetV3-1.0's Ghost modules (Cin, C1, out_channels) at a small odd image: the channel counts
# select the fused GPU kernels' fast paths (16-byte x loads for Cin % 8 == 0, channel pairs for
# even counts, several 64-channel blocks, several input chunks) that the small cases above miss.
GHOSTNET_MODULES = {"16->48": (16, 24, 48), "40->120": (40, 60, 120), "80->200": (80, 100, 200),
                    "112->336": (112, 168, 336), "160->960": (160, 480, 960)}


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
@pytest.mark.parametrize("module", list(GHOSTNET_MODULES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_kernels_at_ghostnet_channel_counts(backend, dtype, module, channels_last):
    device = require(backend, OP, dtype)  # (the gpu mark skips it without a CUDA device)
    Cin, C1, oc = GHOSTNET_MODULES[module]
    for extras in ((), EXTRAS):
        cfg = (2, Cin, C1, 19, 31, channels_last, "relu", "relu", oc, extras, (9, 15))
        args = make_inputs(*cfg, dtype=dtype, device=device)
        extra_tensors = make_extras(cfg, dtype, device)
        out = run(backend, args, "relu", "relu", oc, extra_tensors)
        assert out.is_contiguous(memory_format=expected_format(cfg))
        expected = plain_ghost_extras(args, "relu", "relu", oc, **extra_tensors)
        assert rel_err(out, expected) < TOLERANCE[dtype][0], (module, extras)
