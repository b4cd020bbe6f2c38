"""ghostkernels.ms_deform_attn_softmax (softmax over the L*P points fused into the kernel): every
backend against the float64 reference of softmax + ms_deform_attn, forward and gradients
(value, locations, logits); extreme logits; custom-op registration, torch.compile, decomposed();
argument checks; nn.MSDeformAttn built on it."""
import random

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import ghostkernels
from ghostkernels import use_backend
from ghostkernels.nn import MSDeformAttn
from ghostkernels.reference.ms_deform_attn import ms_deform_attn_forward as reference_forward
from tests.backend_params import (ALL_BACKENDS, DTYPE_IDS, DTYPES, TOLERANCE, backend_params,
                                  require)
from tests.msda_cases import away_from_pixel_boundaries, make_inputs, rel_err

OP = "ms_deform_attn"
CASES = {  # (N, level shapes (h, w), M heads, D channels, Lq queries, P points)
    "basic": (2, [(6, 4), (3, 2)], 2, 4, 5, 2),
    "L3-P3-D5": (1, [(5, 7), (3, 3), (1, 1)], 3, 5, 4, 3),
}


def random_case(seed):
    rng = random.Random(seed)
    shapes = [(rng.randint(1, 7), rng.randint(1, 7)) for _ in range(rng.randint(1, 4))]
    return (rng.randint(1, 2), shapes, rng.randint(1, 3), rng.choice([1, 3, 8]),
            rng.randint(1, 5), rng.randint(1, 5))


def softmax_inputs(case, dtype=torch.float64, device="cpu", logit_scale=2.0):
    """Inputs with random logits (N(0, logit_scale^2)) in place of the weights."""
    value, shapes, starts, loc, weights = make_inputs(*case, dtype=dtype, device=device)
    logits = (torch.randn(weights.shape, dtype=torch.float64) * logit_scale).to(device, dtype)
    return value, shapes, starts, loc, logits


def explicit_softmax(logits):
    return logits.flatten(-2).softmax(-1).view(logits.shape)


def reference64(value, shapes, starts, loc, logits, grad_out):
    """float64 forward and gradients of softmax + the reference, through torch autograd."""
    inputs = [t.detach().double().cpu().requires_grad_() for t in (value, loc, logits)]
    out = reference_forward(inputs[0], shapes.cpu(), starts.cpu(), inputs[1],
                            explicit_softmax(inputs[2]))
    return (out.detach(), *torch.autograd.grad(out, inputs, grad_out.double().cpu()))


def run_with_grads(backend, value, shapes, starts, loc, logits, grad_out):
    inputs = [t.detach().requires_grad_() for t in (value, loc, logits)]
    with use_backend(backend):  # the backward too resolves its backend when it runs
        out = ghostkernels.ms_deform_attn_softmax(inputs[0], shapes, starts, inputs[1], inputs[2])
        return (out.detach(), *torch.autograd.grad(out, inputs, grad_out))


def assert_matches_reference(backend, dtype, args):
    value, loc = args[0], args[3]
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3],
                           dtype=torch.float64).to(value.device, dtype)
    got = run_with_grads(backend, *args, grad_out)
    expected = reference64(*args, grad_out)
    fwd_tol, grad_tol = TOLERANCE[dtype]
    assert got[0].dtype == dtype and torch.isfinite(got[0]).all()
    assert rel_err(got[0], expected[0]) < fwd_tol
    for name, g, r, t in zip(("value", "sampling_locations", "attention_logits"), got[1:],
                             expected[1:], (args[0], args[3], args[4])):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert rel_err(g, r) < grad_tol, name
    return got


@pytest.mark.parametrize("case", list(CASES) + ["random"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_forward_and_gradients_match_reference(backend, dtype, case, _fresh_seed):
    device = require(backend, OP, dtype)
    shape = random_case(_fresh_seed) if case == "random" else CASES[case]
    assert_matches_reference(backend, dtype, softmax_inputs(shape, dtype, device))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_large_logits(backend, dtype):
    """Logits of +-60: exp overflows float16/float32 without the max subtraction."""
    device = require(backend, OP, dtype)
    value, shapes, starts, loc, logits = softmax_inputs(CASES["L3-P3-D5"], dtype, device)
    signs = torch.randint(0, 2, logits.shape, device=device) * 2 - 1
    logits = (signs * (58.0 + 2.0 * torch.rand(logits.shape, device=device))).to(dtype)
    assert_matches_reference(backend, dtype, (value, shapes, starts, loc, logits))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_single_point_has_weight_one_and_zero_logit_gradient(backend, dtype):
    """L*P == 1: the softmax weight is exactly 1 whatever the logit, so its gradient is 0."""
    device = require(backend, OP, dtype)
    value, shapes, starts, loc, logits = softmax_inputs((2, [(5, 3)], 2, 4, 6, 1), dtype, device,
                                                        logit_scale=20.0)
    grad_out = torch.randn(2, 6, 8, dtype=torch.float64).to(device, dtype)
    out, g_value, g_loc, g_logits = run_with_grads(backend, value, shapes, starts, loc, logits,
                                                   grad_out)
    ones = torch.ones_like(logits)
    with use_backend("reference"):
        plain = ghostkernels.ms_deform_attn(value.double().cpu(), shapes.cpu(), starts.cpu(),
                                            loc.double().cpu(), ones.double().cpu())
    assert rel_err(out, plain) < TOLERANCE[dtype][0]
    assert torch.equal(g_logits, torch.zeros_like(g_logits))
    assert g_value.abs().sum() > 0 and g_loc.abs().sum() > 0


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_gradcheck_float64(backend):
    require(backend, OP, torch.float64)
    value, shapes, starts, loc, logits = softmax_inputs(CASES["basic"])
    loc = away_from_pixel_boundaries(loc, shapes)
    inputs = [t.requires_grad_() for t in (value, loc, logits)]
    with use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda v, l, z: ghostkernels.ms_deform_attn_softmax(v, shapes, starts, l, z), inputs)


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_opcheck(backend):
    require(backend, OP, torch.float64)
    value, shapes, starts, loc, logits = softmax_inputs(CASES["basic"])
    with use_backend(backend):
        torch.library.opcheck(torch.ops.ghostkernels.ms_deform_attn.default,
                              (value.requires_grad_(), shapes, starts, loc.requires_grad_(),
                               logits.requires_grad_()), {"softmax": True})


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_torch_compile_fullgraph(backend):
    require(backend, OP, torch.float32)
    value, shapes, starts, loc, logits = softmax_inputs(CASES["basic"], torch.float32)

    def f(v, z):
        return ghostkernels.ms_deform_attn_softmax(v * 2.0, shapes, starts, loc, z).sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with use_backend(backend):
        v, z = value.clone().requires_grad_(), logits.clone().requires_grad_()
        out = compiled(v, z)
        out.sum().backward()
        v2, z2 = value.clone().requires_grad_(), logits.clone().requires_grad_()
        expected = f(v2, z2)
        expected.sum().backward()
    assert rel_err(out.detach(), expected.detach()) < 1e-6
    assert rel_err(v.grad, v2.grad) < 1e-6
    assert rel_err(z.grad, z2.grad) < 1e-6


def test_decomposed_traces_to_softmax_and_grid_sample():
    value, shapes, starts, loc, logits = softmax_inputs(CASES["basic"], torch.float32)

    def fn(v, l, z):
        return ghostkernels.ms_deform_attn_softmax(v, shapes, starts, l, z)

    with ghostkernels.decomposed():
        graph = make_fx(fn)(value, loc, logits)
    ops = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert any("grid_sampler" in op for op in ops), ops
    assert any("softmax" in op for op in ops), ops
    assert not any("ghostkernels" in op for op in ops), ops
    with use_backend("reference"):
        assert rel_err(graph(value, loc, logits), fn(value, loc, logits)) < 1e-6


@pytest.mark.parametrize("bad,exc,words", [
    (lambda z: z[..., :1], ValueError, ["attention_logits", "[N, Lq, M, L, P]", "(2, 5, 2, 2, 1)"]),
    (lambda z: z[:, :, :, None], ValueError, ["attention_logits", "5-d"]),
    (lambda z: z.double(), TypeError, ["attention_logits", "float32", "float64"]),
    (lambda z: z.tolist(), TypeError, ["attention_logits", "torch.Tensor", "list"]),
])
def test_bad_logits_are_rejected_with_a_clear_message(bad, exc, words):
    value, shapes, starts, loc, logits = softmax_inputs(CASES["basic"], torch.float32)
    with pytest.raises(exc) as info:
        ghostkernels.ms_deform_attn_softmax(value, shapes, starts, loc, bad(logits))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_bad_levels_are_rejected_as_in_ms_deform_attn():
    value, shapes, _, loc, logits = softmax_inputs(CASES["basic"], torch.float32)
    with pytest.raises(ValueError, match="level_start_index"):
        ghostkernels.ms_deform_attn_softmax(value, shapes, torch.tensor([0, 23]), loc, logits)


def _randomised_module(dtype, levels, n_points):
    module = MSDeformAttn(d_model=16, n_levels=levels, n_heads=2, n_points=n_points).to(dtype)
    with torch.no_grad():  # the init zeroes the attention weights: randomise them
        module.attention_weights.weight.normal_(0.0, 0.5)
        module.attention_weights.bias.normal_(0.0, 0.5)
        module.sampling_offsets.weight.normal_(0.0, 0.02)
    return module


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_msdeformattn_equals_explicit_softmax_path(backend, dtype):
    device = require(backend, OP, dtype)
    levels = [(6, 5), (3, 3)]
    module = _randomised_module(dtype, len(levels), 3).to(device)
    shapes = torch.tensor(levels, device=device)
    starts = torch.tensor([0, 30], device=device)
    query = torch.randn(2, 7, 16, dtype=dtype, device=device)
    feats = torch.randn(2, 39, 16, dtype=dtype, device=device)
    ref_points = torch.rand(2, 7, 2, 2, dtype=dtype, device=device)
    with use_backend(backend), torch.no_grad():
        out = module(query, ref_points, feats, shapes, starts)
        # the formulation before the fusion: softmax in torch, then ms_deform_attn
        value = module.value_proj(feats).view(2, 39, 2, 8)
        weights = explicit_softmax(module.attention_weights(query).view(2, 7, 2, 2, 3))
        loc = module.sampling_locations(query, ref_points, shapes)
        expected = module.output_proj(ghostkernels.ms_deform_attn(value, shapes, starts, loc,
                                                                  weights))
    assert rel_err(out, expected) < {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
    assert set(module.state_dict()) == {f"{name}.{p}" for name in (
        "sampling_offsets", "attention_weights", "value_proj", "output_proj")
        for p in ("weight", "bias")}


def test_msdeformattn_takes_level_tables_on_the_cpu_for_inputs_elsewhere():
    """ms_deform_attn takes the level tables on the CPU for inputs on another device; so does the
    module: the pixel normaliser of 2-d reference points moves to the offsets' device (it divided
    the offsets by a CPU tensor: a device-mismatch error). Meta stands in for a GPU here."""
    module = _randomised_module(torch.float32, 2, 3).to("meta")
    shapes, starts = torch.tensor([(6, 5), (3, 3)]), torch.tensor([0, 30])
    query, feats = torch.randn(2, 7, 16, device="meta"), torch.randn(2, 39, 16, device="meta")
    for ref_points in (torch.rand(2, 7, 2, 2, device="meta"),  # (x, y) points: normalised
                       torch.rand(2, 7, 1, 4, device="meta")):  # boxes
        out = module(query, ref_points, feats, shapes, starts)
        assert out.is_meta and out.shape == (2, 7, 16)
