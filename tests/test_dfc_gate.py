"""ghostkernels.dfc_gate: every backend against a float64 composition of the five torch ops
(avg_pool2d, conv1x1, depthwise 1x5, depthwise 5x1, sigmoid), gradients, custom-op registration,
torch.compile, decomposition and the argument checks."""
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

OP = "dfc_gate"
# Every backend that implements the op (no C++ cpu kernel: tests/backend_params.require expects
# one per backend)
IMPLEMENTED_BACKENDS = implemented_backends(OP)

# (B, Cin, C, H, W, channels_last)
CASES = {
    "odd-hw-nchw": (2, 5, 7, 9, 11, False),  # pools floor: the last row and column are dropped
    "odd-hw-cl": (1, 6, 9, 7, 13, True),
    "pooled-1x1-cl": (2, 4, 6, 3, 2, True),  # one pooled pixel: every other stencil tap is padding
    "pooled-one-row": (1, 3, 5, 2, 12, False),
    "pooled-one-column-cl": (1, 8, 3, 10, 3, True),
    "one-channel": (1, 1, 1, 6, 6, False),
    "wide-70-channels-cl": (1, 33, 70, 6, 8, True),  # crosses the Triton channel blocks
    "many-pixels-nchw": (1, 3, 2, 30, 40, False),  # crosses the Triton pixel blocks
}
CASE_NAMES = list(CASES) + ["random"]


def random_case(rng: random.Random, small: bool):
    """Cin 1..40, C 1..70, H, W 2..19 (odd ones included); smaller for the Triton interpreter."""
    return (rng.randint(1, 2), rng.randint(1, 12 if small else 40),
            rng.randint(1, 24 if small else 70), rng.randint(2, 11 if small else 19),
            rng.randint(2, 11 if small else 19), rng.random() < 0.5)


def case(name, seed, backend="reference"):
    if name == "random":
        return random_case(random.Random(seed), small=backend == "triton")
    return CASES[name]


def make_inputs(B, Cin, C, H, W, channels_last, dtype=torch.float64, device="cpu"):
    """(x, w_proj, b_proj, w_h, b_h, w_v, b_v) scaled so the logits spread over the sigmoid."""
    x = torch.randn(B, Cin, H, W, dtype=dtype, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w_proj = torch.randn(C, Cin, 1, 1, dtype=dtype, device=device) / Cin ** 0.5
    w_h = torch.randn(C, 1, 1, 5, dtype=dtype, device=device) / 5 ** 0.5
    w_v = torch.randn(C, 1, 5, 1, dtype=dtype, device=device) / 5 ** 0.5
    b_proj, b_h, b_v = (0.5 * torch.randn(C, dtype=dtype, device=device) for _ in range(3))
    return x, w_proj, b_proj, w_h, b_h, w_v, b_v


def plain_gate(x, w_proj, b_proj, w_h, b_h, w_v, b_v):
    """The definition as five plain PyTorch ops in float64 on the CPU (no ghostkernels code)."""
    x, w_proj, w_h, w_v = (t.double().cpu() for t in (x, w_proj, w_h, w_v))
    b_proj, b_h, b_v = (None if b is None else b.double().cpu() for b in (b_proj, b_h, b_v))
    C = w_proj.shape[0]
    y = F.avg_pool2d(x, kernel_size=2, stride=2)
    y = F.conv2d(y, w_proj, b_proj)
    y = F.conv2d(y, w_h, b_h, padding=(0, 2), groups=C)
    y = F.conv2d(y, w_v, b_v, padding=(2, 0), groups=C)
    return torch.sigmoid(y)


def expected_format(cfg):
    B, Cin, C, H, W, channels_last = cfg
    return torch.channels_last if channels_last and Cin > 1 else torch.contiguous_format


def run(backend, *args):
    with use_backend(backend):
        return ghostkernels.dfc_gate(*args)


def test_reference_matches_plain_composition():
    rng = random.Random(torch.initial_seed())
    for i in range(12):
        cfg = list(CASES.values())[i] if i < len(CASES) else random_case(rng, small=False)
        args = make_inputs(*cfg)
        out = run("reference", *args)
        assert rel_err(out, plain_gate(*args)) < 1e-12, cfg
        assert out.is_contiguous(memory_format=expected_format(cfg)), cfg


def test_padding_pads_each_conv_input_with_zeros():
    """A hand-checked consequence of the zero padding: on a one-row pooled map the 5x1 sees only
    its centre tap, and the 1x5 result there is bias + taps on the in-map columns only."""
    x = torch.randn(1, 1, 2, 6, dtype=torch.float64)
    w_proj = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    b_proj = torch.zeros(1, dtype=torch.float64)
    w_h = torch.randn(1, 1, 1, 5, dtype=torch.float64)
    w_v = torch.randn(1, 1, 5, 1, dtype=torch.float64)
    b_h, b_v = torch.randn(1, dtype=torch.float64), torch.randn(1, dtype=torch.float64)
    pooled = F.avg_pool2d(x, 2, 2)[0, 0, 0]  # 3 values
    taps = w_h[0, 0, 0]
    across = torch.stack([b_h[0] + sum(taps[j + 2 - c] * pooled[j] for j in range(3)
                                       if 0 <= j + 2 - c < 5) for c in range(3)])
    expected = torch.sigmoid(across * w_v[0, 0, 2, 0] + b_v[0])
    out = ghostkernels.dfc_gate(x, w_proj, b_proj, w_h, b_h, w_v, b_v)
    assert torch.allclose(out[0, 0, 0], expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", IMPLEMENTED_BACKENDS)
def test_forward_matches_definition(backend, dtype, name, _fresh_seed, poisoned_empty):
    device = require(backend, OP, dtype)
    cfg = case(name, _fresh_seed, backend)
    B, Cin, C, H, W, cl = cfg
    args = make_inputs(*cfg, dtype=dtype, device=device)
    out = run(backend, *args)
    assert out.dtype == dtype and out.device.type == device
    assert out.shape == (B, C, H // 2, W // 2)
    assert out.is_contiguous(memory_format=expected_format(cfg)), (cfg, out.stride())
    assert torch.isfinite(out).all()
    assert rel_err(out, plain_gate(*args)) < TOLERANCE[dtype][0], cfg


@pytest.mark.parametrize("name", ["odd-hw-cl", "pooled-1x1-cl", "random"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", IMPLEMENTED_BACKENDS)
def test_gradients_match_definition(backend, dtype, name, _fresh_seed):
    device = require(backend, OP, dtype)
    cfg = case(name, _fresh_seed, backend)
    args = make_inputs(*cfg, dtype=dtype, device=device)
    inputs = [t.detach().requires_grad_() for t in args]
    out = run(backend, *inputs)
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, grad_out.to(device=device, dtype=dtype))
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in args]
    ref_grads = torch.autograd.grad(plain_gate(*ref_inputs), ref_inputs, grad_out)
    names = ("x", "w_proj", "b_proj", "w_h", "b_h", "w_v", "b_v")
    for name_, g, r, t in zip(names, grads, ref_grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, name_
        assert rel_err(g, r) < TOLERANCE[dtype][1], (name_, cfg)


def test_gradient_of_only_some_inputs():
    args = make_inputs(*CASES["odd-hw-nchw"])
    w_v = args[5].detach().requires_grad_()
    out = ghostkernels.dfc_gate(*args[:5], w_v, args[6])
    (g,) = torch.autograd.grad(out.sum(), [w_v])
    ref_w_v = args[5].detach().requires_grad_()
    (r,) = torch.autograd.grad(plain_gate(*args[:5], ref_w_v, args[6]).sum(), [ref_w_v])
    assert rel_err(g, r) < 1e-12


def test_gradcheck_float64():
    for cfg in ((2, 3, 4, 7, 6, True), (1, 2, 3, 2, 5, False), (1, 1, 2, 11, 3, True)):
        inputs = [t.requires_grad_() for t in make_inputs(*cfg)]
        with use_backend("reference"):
            assert torch.autograd.gradcheck(ghostkernels.dfc_gate, inputs, fast_mode=True)


def test_no_biases_non_contiguous_input_and_empty_batch():
    x, w_proj, _, w_h, _, w_v, _ = make_inputs(*CASES["odd-hw-nchw"])
    x_strided = torch.stack([x, x], dim=-1)[..., 0]  # a strided view with the values of x
    assert not x_strided.is_contiguous()
    out = ghostkernels.dfc_gate(x_strided, w_proj.flatten(1), None, w_h, None, w_v, None)
    assert rel_err(out, plain_gate(x, w_proj, None, w_h, None, w_v, None)) < 1e-12
    empty = ghostkernels.dfc_gate(x[:0], w_proj, None, w_h, None, w_v, None)
    assert empty.shape == (0, 7, 4, 5)


@pytest.mark.parametrize("backend", backend_params("reference", "triton", "cuda"))
def test_opcheck(backend):
    dtype = torch.float64 if backend != "triton" else torch.float32
    device = require(backend, OP, dtype)
    x, w_proj, b_proj, w_h, b_h, w_v, b_v = make_inputs(1, 3, 4, 7, 6, True, dtype=dtype,
                                                        device=device)
    args = (x, w_proj.flatten(1), b_proj, w_h.reshape(4, 5), b_h, w_v.reshape(4, 5), b_v)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.ghostkernels.dfc_gate.default,
                              tuple(t.requires_grad_() for t in args))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_torch_compile_fullgraph(channels_last):
    args = make_inputs(2, 4, 6, 9, 8, channels_last, dtype=torch.float32)

    def f(x, *params):
        return ghostkernels.dfc_gate(x * 2.0, *params).square().sum()

    assert_compiled_matches_eager(f, args)


def test_decomposes_to_plain_ops():
    args = make_inputs(2, 5, 6, 9, 7, False, dtype=torch.float32)
    with ghostkernels.decomposed():
        graph = make_fx(ghostkernels.dfc_gate)(*args)
    ops = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert any("avg_pool2d" in op for op in ops) and any("convolution" in op for op in ops), ops
    assert not any("ghostkernels" in op for op in ops), ops
    assert rel_err(graph(*args), ghostkernels.dfc_gate(*args)) < 1e-6


BAD_INPUTS = {
    "x-3d": (dict(x=torch.randn(4, 6, 6)), ValueError, "x must be a 4-d"),
    "x-int": (dict(x=torch.ones(1, 4, 6, 6, dtype=torch.int64)), TypeError, "x must have dtype"),
    "x-1-row": (dict(x=torch.randn(1, 4, 1, 6)), ValueError, "x must be at least 2x2"),
    "x-no-channels": (dict(x=torch.randn(1, 0, 6, 6)), ValueError,
                      "x must have at least one channel"),
    "w_proj-3x3": (dict(w_proj=torch.randn(5, 4, 3, 3)), ValueError, "w_proj must be a 1x1"),
    "w_proj-3d": (dict(w_proj=torch.randn(5, 4, 1)), ValueError, "w_proj must be [C, Cin, 1, 1]"),
    "w_proj-cin": (dict(w_proj=torch.randn(5, 3, 1, 1)), ValueError,
                   "w_proj must have size 4 (input channels Cin of x)"),
    "w_proj-dtype": (dict(w_proj=torch.randn(5, 4, 1, 1, dtype=torch.float64)), TypeError,
                     "w_proj must have the dtype of x"),
    "w_proj-device": (dict(w_proj=torch.randn(5, 4, 1, 1, device="meta")), ValueError,
                      "w_proj must be on the device of x"),
    "w_h-transposed": (dict(w_h=torch.randn(5, 1, 5, 1)), ValueError,
                       "w_h must have shape [C, 1, 1, 5] = [5, 1, 1, 5]"),
    "w_v-channels": (dict(w_v=torch.randn(4, 1, 5, 1)), ValueError,
                     "w_v must have shape [C, 1, 5, 1] = [5, 1, 5, 1]"),
    "w_v-dtype": (dict(w_v=torch.randn(5, 1, 5, 1, dtype=torch.float16)), TypeError,
                  "w_v must have the dtype of x"),
    "w_h-not-tensor": (dict(w_h=[[0.0] * 5] * 5), TypeError, "w_h must be a torch.Tensor"),
    "b_proj-shape": (dict(b_proj=torch.randn(4)), ValueError, "b_proj must have shape [5]"),
    "b_h-dtype": (dict(b_h=torch.randn(5, dtype=torch.float64)), TypeError,
                  "b_h must have the dtype of x"),
    "b_v-device": (dict(b_v=torch.randn(5, device="meta")), ValueError,
                   "b_v must be on the device of x"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(name):
    changes, error, message = BAD_INPUTS[name]
    x, w_proj, b_proj, w_h, b_h, w_v, b_v = make_inputs(1, 4, 5, 6, 6, False, dtype=torch.float32)
    call = dict(x=x, w_proj=w_proj, b_proj=b_proj, w_h=w_h, b_h=b_h, w_v=w_v, b_v=b_v)
    call.update(changes)
    with pytest.raises(error, match=re.escape(message)):
        ghostkernels.dfc_gate(**call)

