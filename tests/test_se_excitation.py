"""ghostkernels.se_excitation: every backend against a float64 composition of the SE block's torch
ops (1x1 conv, ReLU, 1x1 conv, hard-sigmoid on [B, C, 1, 1]), gradients, custom-op registration,
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

OP = "se_excitation"
IMPLEMENTED_BACKENDS = implemented_backends(OP)

# (B, C, R)
CASES = {
    "one-channel": (2, 1, 1),
    "one-hidden": (3, 9, 1),
    "one-channel-five-hidden": (2, 1, 5),
    "odd": (2, 7, 3),
    "ghostnet-72": (1, 72, 20),  # GhostNetV3's first SE block
    "crosses-blocks": (2, 131, 37),  # several Triton channel, C-chunk and R-chunk blocks
}
CASE_NAMES = list(CASES) + ["random"]


def random_case(rng: random.Random, small: bool):
    """B 1..3, C 1..150, R 1..48; smaller for the Triton interpreter."""
    return (rng.randint(1, 3), rng.randint(1, 90 if small else 150),
            rng.randint(1, 40 if small else 48))


def case(name, seed, backend="reference"):
    if name == "random":
        return random_case(random.Random(seed), small=backend == "triton")
    return CASES[name]


def make_inputs(B, C, R, dtype=torch.float64, device="cpu"):
    """(pooled, w_reduce, b_reduce, w_expand, b_expand), the weights shaped as the SE block's 1x1
    convs; scaled so the logits (std about 2.8) fall on both hard-sigmoid clamps (|z| >= 3) and
    between them."""
    pooled = torch.randn(B, C, dtype=dtype, device=device)
    w_reduce = torch.randn(R, C, 1, 1, dtype=dtype, device=device) / C ** 0.5
    b_reduce = 0.5 * torch.randn(R, dtype=dtype, device=device)
    w_expand = 3 * torch.randn(C, R, 1, 1, dtype=dtype, device=device) / R ** 0.5
    b_expand = 1.5 * torch.randn(C, dtype=dtype, device=device)
    return pooled, w_reduce, b_reduce, w_expand, b_expand


def plain_excitation(pooled, w_reduce, b_reduce, w_expand, b_expand):
    """SqueezeExcite's definition as plain PyTorch ops in float64 on the CPU (no ghostkernels)."""
    pooled, w_reduce, w_expand = (t.double().cpu() for t in (pooled, w_reduce, w_expand))
    b_reduce, b_expand = (None if b is None else b.double().cpu() for b in (b_reduce, b_expand))
    R, C = w_reduce.shape[0], pooled.shape[1]
    s = pooled[:, :, None, None]
    s = F.relu(F.conv2d(s, w_reduce.reshape(R, C, 1, 1), b_reduce))
    return F.hardsigmoid(F.conv2d(s, w_expand.reshape(C, R, 1, 1), b_expand)).flatten(1)


def gradient_magnitudes(pooled, w_reduce, b_reduce, w_expand, b_expand, grad_out):
    """Per input, the gradient's chain rule with every product taken in absolute value (float64):
    the scale of the signed terms each gradient sums. A float32 gradient is right to about its
    precision times this scale; relative to the gradient itself it can be far off where the terms
    cancel (a single hidden unit: b_reduce's gradient is one sum of B*C signed terms)."""
    p, wr, br, we, be = (t.detach().double().cpu() for t in (pooled, w_reduce, b_reduce,
                                                             w_expand, b_expand))
    R, C = wr.shape[0], p.shape[1]
    wr, we = wr.reshape(R, C), we.reshape(C, R)
    h = p @ wr.T + br
    a = h.clamp_min(0)
    z = a @ we.T + be
    g_z = grad_out.abs() * ((z > -3) & (z < 3)) / 6
    g_h = (g_z @ we.abs()) * (h > 0)
    return (g_h @ wr.abs(), (g_h.T @ p.abs()).reshape(R, C, 1, 1), g_h.sum(0),
            (g_z.T @ a).reshape(C, R, 1, 1), g_z.sum(0))


def run(backend, *args):
    with use_backend(backend):
        return ghostkernels.se_excitation(*args)


def test_reference_matches_plain_composition():
    rng = random.Random(torch.initial_seed())
    for i in range(10):
        cfg = list(CASES.values())[i] if i < len(CASES) else random_case(rng, small=False)
        args = make_inputs(*cfg)
        out = run("reference", *args)
        assert out.shape == cfg[:2] and out.is_contiguous()
        assert rel_err(out, plain_excitation(*args)) < 1e-12, cfg


def test_hand_computed_values():
    """Both hard-sigmoid clamps, its linear part and a ReLU that zeroes a hidden unit."""
    pooled = torch.tensor([[1.0, 2.0], [2.0, 0.0]], dtype=torch.float64)
    w_reduce = torch.tensor([[1.0, -1.0], [2.0, 1.0]], dtype=torch.float64)
    b_reduce = torch.tensor([0.5, -1.0], dtype=torch.float64)
    w_expand = torch.tensor([[1.0, 0.5], [0.5, -2.0]], dtype=torch.float64)
    b_expand = torch.tensor([0.0, 1.0], dtype=torch.float64)
    # hidden: relu([-0.5, 3]) = [0, 3] and relu([2.5, 3]) = [2.5, 3]
    # logits: [1.5, -5] and [4, -3.75] -> hardsigmoid [0.75, 0] and [1, 0]
    out = ghostkernels.se_excitation(pooled, w_reduce, b_reduce, w_expand, b_expand)
    assert torch.equal(out, torch.tensor([[0.75, 0.0], [1.0, 0.0]], dtype=torch.float64))


def test_inputs_reach_both_clamps_and_the_linear_part():
    scale = plain_excitation(*make_inputs(16, 131, 37))  # 3000 seeds: 7 % to 83 % each
    for part in (scale == 0, scale == 1, (scale > 0) & (scale < 1)):
        assert 0.03 < part.double().mean() < 0.95


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", IMPLEMENTED_BACKENDS)
def test_forward_matches_definition(backend, dtype, name, _fresh_seed, poisoned_empty):
    device = require(backend, OP, dtype)
    cfg = case(name, _fresh_seed, backend)
    args = make_inputs(*cfg, dtype=dtype, device=device)
    out = run(backend, *args)
    assert out.dtype == dtype and out.device.type == device
    assert out.shape == cfg[:2] and out.is_contiguous()
    assert ((out >= 0) & (out <= 1)).all()  # also: no NaN left from an unwritten element
    assert rel_err(out, plain_excitation(*args)) < TOLERANCE[dtype][0], cfg


@pytest.mark.parametrize("name", ["one-hidden", "crosses-blocks", "random"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", IMPLEMENTED_BACKENDS)
def test_gradients_match_definition(backend, dtype, name, _fresh_seed):
    device = require(backend, OP, dtype)
    cfg = case(name, _fresh_seed, backend)
    args = make_inputs(*cfg, dtype=dtype, device=device)
    inputs = [t.detach().requires_grad_() for t in args]
    out = run(backend, *inputs)
    # rounded to the dtype first: the reference sees the grad_out the backend gets (the pooled
    # gradient sums signed terms, so a small result would otherwise amplify that rounding)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype).double()
    grads = torch.autograd.grad(out, inputs, grad_out.to(device=device, dtype=dtype))
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in args]
    ref_grads = torch.autograd.grad(plain_excitation(*ref_inputs), ref_inputs, grad_out)
    names = ("pooled", "w_reduce", "b_reduce", "w_expand", "b_expand")
    scales = gradient_magnitudes(*args, grad_out)
    for name_, g, r, t, scale in zip(names, grads, ref_grads, inputs, scales):
        assert g.dtype == t.dtype and g.shape == t.shape, name_
        if r.norm() == 0:  # every hidden unit or output clamped (tiny cases): exact zeros
            assert torch.equal(g.double().cpu(), r), (name_, cfg)
        else:  # relative to the summed terms' scale, >= the gradient's own norm
            assert rel_err(g, r) * float(r.norm() / scale.norm()) < TOLERANCE[dtype][1], \
                (name_, cfg, rel_err(g, r))


def test_gradient_of_only_some_inputs():
    args = make_inputs(*CASES["crosses-blocks"])
    w_reduce = args[1].detach().requires_grad_()
    out = ghostkernels.se_excitation(args[0], w_reduce, *args[2:])
    (g,) = torch.autograd.grad(out.sum(), [w_reduce])
    ref_w_reduce = args[1].detach().requires_grad_()
    (r,) = torch.autograd.grad(plain_excitation(args[0], ref_w_reduce, *args[2:]).sum(),
                               [ref_w_reduce])
    assert rel_err(g, r) < 1e-12


def test_gradcheck_float64():
    for cfg in ((2, 5, 3), (1, 1, 1), (3, 9, 4)):
        inputs = [t.requires_grad_() for t in make_inputs(*cfg)]
        with use_backend("reference"):
            assert torch.autograd.gradcheck(ghostkernels.se_excitation, inputs, fast_mode=True)


def test_no_biases_matrix_weights_non_contiguous_input_and_empty_batch():
    pooled, w_reduce, _, w_expand, _ = make_inputs(*CASES["odd"])
    strided = torch.stack([pooled, pooled], dim=-1)[..., 0]
    assert not strided.is_contiguous()
    out = ghostkernels.se_excitation(strided, w_reduce.flatten(1), None, w_expand.flatten(1), None)
    assert rel_err(out, plain_excitation(pooled, w_reduce, None, w_expand, None)) < 1e-12
    empty = ghostkernels.se_excitation(pooled[:0], w_reduce, None, w_expand, None)
    assert empty.shape == (0, 7)


@pytest.mark.parametrize("backend", backend_params("reference", "triton"))
def test_opcheck(backend):
    dtype = torch.float64 if backend != "triton" else torch.float32
    device = require(backend, OP, dtype)
    pooled, w_reduce, b_reduce, w_expand, b_expand = make_inputs(2, 6, 3, dtype=dtype,
                                                                 device=device)
    args = (pooled, w_reduce.flatten(1), b_reduce, w_expand.flatten(1), b_expand)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.ghostkernels.se_excitation.default,
                              tuple(t.requires_grad_() for t in args))


def test_torch_compile_fullgraph():
    args = make_inputs(2, 12, 4, dtype=torch.float32)

    def f(x, *params):
        return ghostkernels.se_excitation(x.mean((2, 3)), *params).square().sum()

    x = torch.randn(2, 12, 5, 3)
    assert_compiled_matches_eager(f, (x, *args[1:]))


def test_decomposes_to_plain_ops():
    args = make_inputs(2, 9, 4, dtype=torch.float32)
    with ghostkernels.decomposed():
        graph = make_fx(ghostkernels.se_excitation)(*args)
    ops = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert any("hardsigmoid" in op for op in ops), ops
    assert not any("ghostkernels" in op for op in ops), ops
    assert rel_err(graph(*args), ghostkernels.se_excitation(*args)) < 1e-6


BAD_INPUTS = {
    "pooled-4d": (dict(pooled=torch.randn(2, 6, 1, 1)), ValueError, "pooled must be a 2-d"),
    "pooled-int": (dict(pooled=torch.ones(2, 6, dtype=torch.int64)), TypeError,
                   "pooled must have dtype"),
    "pooled-no-channels": (dict(pooled=torch.randn(2, 0)), ValueError,
                           "pooled must have at least one channel"),
    "pooled-not-tensor": (dict(pooled=[[0.0] * 6] * 2), TypeError,
                          "pooled must be a torch.Tensor"),
    "w_reduce-3x3": (dict(w_reduce=torch.randn(3, 6, 3, 3)), ValueError,
                     "w_reduce must be [R, C, 1, 1] (a 1x1 conv weight) or [R, C], got shape"),
    "w_reduce-no-hidden": (dict(w_reduce=torch.randn(0, 6)), ValueError,
                           "w_reduce must have at least one output channel R"),
    "w_reduce-channels": (dict(w_reduce=torch.randn(3, 5, 1, 1)), ValueError,
                          "w_reduce must have size 6 (channels C of pooled)"),
    "w_reduce-dtype": (dict(w_reduce=torch.randn(3, 6, 1, 1, dtype=torch.float64)), TypeError,
                       "w_reduce must have the dtype of pooled (float32), got float64"),
    "w_expand-transposed": (dict(w_expand=torch.randn(3, 6, 1, 1)), ValueError,
                            "w_expand must have size 6 (channels C of pooled) in dimension 0"),
    "w_expand-hidden": (dict(w_expand=torch.randn(6, 4)), ValueError,
                        "w_expand must have size 3 (hidden channels R of w_reduce)"),
    "w_expand-1d": (dict(w_expand=torch.randn(18)), ValueError, "w_expand must be [C, R, 1, 1]"),
    "w_expand-device": (dict(w_expand=torch.randn(6, 3, 1, 1, device="meta")), ValueError,
                        "w_expand must be on the device of pooled"),
    "b_reduce-shape": (dict(b_reduce=torch.randn(6)), ValueError, "b_reduce must have shape [3]"),
    "b_expand-dtype": (dict(b_expand=torch.randn(6, dtype=torch.float16)), TypeError,
                       "b_expand must have the dtype of pooled"),
    "b_expand-device": (dict(b_expand=torch.randn(6, device="meta")), ValueError,
                        "b_expand must be on the device of pooled"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(name):
    changes, error, message = BAD_INPUTS[name]
    pooled, w_reduce, b_reduce, w_expand, b_expand = make_inputs(2, 6, 3, dtype=torch.float32)
    call = dict(pooled=pooled, w_reduce=w_reduce, b_reduce=b_reduce, w_expand=w_expand,
                b_expand=b_expand)
    call.update(changes)
    with pytest.raises(error, match=re.escape(message)):
        ghostkernels.se_excitation(**call)
