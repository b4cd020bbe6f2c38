"""Deterministic ms_deform_attn backward: grad_value accumulated in int64 fixed point (scale from
``fixed_point_scale``) instead of float atomics, on the GPU backends (triton, cuda).

Without a GPU the Triton backend runs in the interpreter (its programs run one after another, so
bitwise reproducibility is only meaningful on a GPU: those tests are marked ``gpu``); the
fixed-point arithmetic itself is checked here against the float64 reference.
"""
import pytest
import torch

import ghostkernels
from ghostkernels import backends, use_backend
from ghostkernels.ops.ms_deform_attn import fixed_point_scale
from ghostkernels.reference import ms_deform_attn as reference
from tests.backend_params import TOLERANCE, backend_params, require
from tests.msda_cases import make_inputs, rel_err

OP = "ms_deform_attn"
HALF_AND_SINGLE = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]
GPU_BACKENDS = backend_params("triton", "cuda")


@pytest.fixture
def deterministic_algorithms():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def colliding_inputs(dtype, device, N=2, Lq=24, M=2, D=5, P=4, softmax=False):
    """Every point of every query lands within a pixel of the centre of small maps, so each value
    pixel receives many contributions (the case where atomics' order matters)."""
    value, shapes, starts, loc, weights = make_inputs(N, [(2, 3), (1, 2)], M, D, Lq, P,
                                                      dtype=torch.float64)
    loc = 0.5 + (torch.rand(loc.shape, dtype=torch.float64) - 0.5) * 0.3
    if softmax:
        weights = torch.randn(weights.shape, dtype=torch.float64) * 2.0
    grad_out = torch.randn(N, Lq, M * D, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (grad_out.to(device, dtype), value.to(device, dtype), shapes.to(device),
            starts.to(device), loc.to(device, acc), weights.to(device, dtype))


def kernel_backward(backend, args, softmax, scale):
    return backends.implementations(OP)[backend].load().backward(
        *args, softmax=softmax, fixed_point_scale=scale)


def reference64(args, softmax):
    grad_out, value, shapes, starts, loc, weights = args
    return reference.backward(grad_out.double().cpu(), value.double().cpu(), shapes.cpu(),
                              starts.cpu(), loc.double().cpu(), weights.double().cpu(),
                              softmax=softmax)


def scale_for(args, softmax):
    grad_out, loc, weights = args[0], args[4], args[5]
    return fixed_point_scale(grad_out, weights, loc.shape[1], loc.shape[4], softmax)


# ------------------------------------------------------------------------------------------
# The scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_scale_is_the_largest_safe_power_of_two(dtype):
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    for _ in range(50):
        g_mag, w_mag = 10.0 ** (torch.rand(2, generator=gen, dtype=torch.float64) * 40 - 20)
        grad_out = (torch.randn(3, 4, 6, generator=gen, dtype=torch.float64) * g_mag).to(dtype)
        weights = (torch.rand(3, 4, 2, 3, 5, generator=gen, dtype=torch.float64) * w_mag).to(dtype)
        Lq, P = int(torch.randint(1, 1000, (), generator=gen)), int(torch.randint(1, 9, ()))
        for softmax in (False, True):
            scale = fixed_point_scale(grad_out, weights, Lq, P, softmax)
            assert scale.dtype == torch.float64 and scale.dim() == 0
            bound = Lq * P * grad_out.double().abs().max() * (
                1.0 if softmax else weights.double().abs().max())
            mantissa, _ = torch.frexp(scale)
            assert mantissa == 0.5, scale  # a power of two
            assert 2.0 ** 61 < bound * scale <= 2.0 ** 62, (bound, scale)


def test_scale_of_a_power_of_two_bound_reaches_2_pow_62():
    grad_out = torch.tensor([0.25, -0.5])
    weights = torch.tensor([0.125, 0.0625])
    scale = fixed_point_scale(grad_out, weights, 8, 4, False)  # bound = 32 * 0.5 * 0.125 = 2
    assert scale == 2.0 ** 61
    assert fixed_point_scale(grad_out, weights, 8, 4, True) == 2.0 ** 58  # bound = 32 * 0.5


def test_scale_of_zero_is_one_and_of_non_finite_inputs_nan():
    zeros, ones = torch.zeros(4, 3), torch.ones(4, 3)
    assert fixed_point_scale(zeros, ones, 5, 2, False) == 1.0
    assert fixed_point_scale(ones, zeros, 5, 2, False) == 1.0
    assert fixed_point_scale(zeros[:0], ones[:0], 5, 2, False) == 1.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = torch.rand(4, 3) + 0.5
        poisoned[2, 1] = bad
        assert fixed_point_scale(poisoned, ones, 5, 2, False).isnan()
        assert fixed_point_scale(ones, poisoned, 5, 2, False).isnan()
        assert fixed_point_scale(poisoned, ones, 5, 2, True).isnan()
        # softmax logits: NaN and +inf poison the weights, -inf is a legitimate mask (weight 0)
        assert fixed_point_scale(ones, poisoned, 5, 2, True).isnan() == (bad != -float("inf"))


def test_scale_compiles_without_a_host_sync():
    """fullgraph=True fails on a graph break, which a host read (.item(), bool()) would cause."""
    grad_out, weights = torch.randn(3, 8), torch.rand(3, 8)
    torch._dynamo.reset()
    compiled = torch.compile(lambda g, w: fixed_point_scale(g, w, 30, 4, False), fullgraph=True,
                             backend="aot_eager")
    assert compiled(grad_out, weights) == fixed_point_scale(grad_out, weights, 30, 4, False)


# ------------------------------------------------------------------------------------------
# The kernels with a scale


@pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
@pytest.mark.parametrize("dtype", HALF_AND_SINGLE, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fixed_point_backward_matches_float_path_and_reference(backend, dtype, softmax):
    device = require(backend, OP, dtype)
    args = colliding_inputs(dtype, device, softmax=softmax)
    fixed = kernel_backward(backend, args, softmax, scale_for(args, softmax))
    floating = kernel_backward(backend, args, softmax, None)
    expected = reference64(args, softmax)
    grad_tol = TOLERANCE[dtype][1]
    for name, f, g, r in zip(("value", "locations", "weights"), fixed, floating, expected):
        assert f.shape == r.shape and torch.isfinite(f).all(), name
        assert rel_err(f, r) < grad_tol, name
    # float32 accumulation either way: the two agree far inside the dtype tolerance
    assert rel_err(fixed[0], floating[0]) < 1e-6
    # only grad_value changes path: the other two are the same computation
    assert torch.equal(fixed[1], floating[1]) and torch.equal(fixed[2], floating[2])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fixed_point_handles_hundreds_of_contributions_per_pixel(backend):
    """A 1x1 map: all Lq*P points of every query share one pixel (the largest sums)."""
    device = require(backend, OP, torch.float32)
    value, shapes, starts, loc, weights = make_inputs(1, [(1, 1)], 1, 3, 96, 6,
                                                      loc_range=(0.3, 0.7), dtype=torch.float32,
                                                      device=device)
    grad_out = torch.randn(1, 96, 3, device=device)
    args = (grad_out, value, shapes, starts, loc, weights)
    fixed = kernel_backward(backend, args, False, scale_for(args, False))
    expected = reference64(args, False)
    assert rel_err(fixed[0], expected[0]) < TOLERANCE[torch.float32][1]


@pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_two_fixed_point_runs_are_bitwise_equal(backend, softmax):
    device = require(backend, OP, torch.float16)
    args = colliding_inputs(torch.float16, device, softmax=softmax)
    first = kernel_backward(backend, args, softmax, scale_for(args, softmax))
    second = kernel_backward(backend, args, softmax, scale_for(args, softmax))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # the interpreter's numpy
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_finite_grad_output_makes_grad_value_nan(backend):
    device = require(backend, OP, torch.float32)
    args = list(colliding_inputs(torch.float32, device))
    args[0][0, 3, 1] = float("inf")
    scale = scale_for(args, False)
    assert scale.isnan()
    assert kernel_backward(backend, args, False, scale)[0].isnan().all()


# ------------------------------------------------------------------------------------------
# Through the op layer and autograd


def record_scales(backend, monkeypatch) -> list:
    """The fixed_point_scale argument of every call of ``backend``'s backward, from now on."""
    module = backends.implementations(OP)[backend].load()
    seen = []
    original = module.backward

    def spy(*a, **kw):
        seen.append(kw["fixed_point_scale"])
        return original(*a, **kw)

    monkeypatch.setattr(module, "backward", spy)
    return seen



@pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_backward_op_with_deterministic_passes_the_scale(backend, softmax, monkeypatch):
    """The backward custom op, called with deterministic=True, hands the backend the scale of
    fixed_point_scale (on any device: the autograd formula decides when to ask for it)."""
    device = require(backend, OP, torch.float32)
    args = colliding_inputs(torch.float32, device, softmax=softmax)
    expected = reference64(args, softmax)
    seen = record_scales(backend, monkeypatch)
    with use_backend(backend):
        grads = torch.ops.ghostkernels.ms_deform_attn_backward(*args, softmax, True)
    assert len(seen) == 1 and torch.equal(seen[0], scale_for(args, softmax))
    for g, r in zip(grads, expected):
        assert rel_err(g, r) < TOLERANCE[torch.float32][1]


@pytest.mark.parametrize("backend", backend_params("cpu", "triton", "cuda"))
def test_opcheck_backward_op_with_deterministic(backend):
    """(Not the reference: its torch.func.vjp cannot run under opcheck's schema check.)"""
    device = require(backend, OP, torch.float32)
    args = colliding_inputs(torch.float32, device, N=1, Lq=5, softmax=True)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.ghostkernels.ms_deform_attn_backward.default,
                              (*args, True, True))


@pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
@pytest.mark.parametrize("backend", backend_params("reference", "cpu", "triton", "cuda"))
def test_autograd_under_deterministic_algorithms(backend, softmax, monkeypatch,
                                                 deterministic_algorithms):
    """With use_deterministic_algorithms(True) the autograd formula asks for the fixed-point
    path exactly when value is on a GPU, and the gradients stay right."""
    device = require(backend, OP, torch.float32)
    grad_out, value, shapes, starts, loc, weights = colliding_inputs(torch.float32, device,
                                                                     softmax=softmax)
    expected = reference64((grad_out, value, shapes, starts, loc, weights), softmax)
    seen = record_scales(backend, monkeypatch)
    fn = ghostkernels.ms_deform_attn_softmax if softmax else ghostkernels.ms_deform_attn
    inputs = [t.detach().requires_grad_() for t in (value, loc, weights)]
    with use_backend(backend):
        out = fn(inputs[0], shapes, starts, inputs[1], inputs[2])
        grads = torch.autograd.grad(out, inputs, grad_out)
    assert len(seen) == 1
    assert (seen[0] is not None) == (device == "cuda")
    for g, r in zip(grads, expected):
        assert rel_err(g, r) < TOLERANCE[torch.float32][1]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deterministic_backward_is_bitwise_reproducible_on_gpu(backend, softmax, dtype):
    """Heavy pixel collisions (thousands of queries on 4x4 and 2x2 maps): 5 backward runs under
    use_deterministic_algorithms(True) are bitwise identical, and the default float-atomic path
    agrees with them within tolerance."""
    device = require(backend, OP, dtype)
    grad_out, value, shapes, starts, loc, weights = colliding_inputs(
        dtype, device, N=2, Lq=3000, M=8, D=32, P=4, softmax=softmax)
    value = value.new_empty(2, 20, 8, 32).normal_()
    shapes = torch.tensor([[4, 4], [2, 2]], device=device)
    starts = torch.tensor([0, 16], device=device)
    fn = ghostkernels.ms_deform_attn_softmax if softmax else ghostkernels.ms_deform_attn

    def grads():
        inputs = [t.detach().requires_grad_() for t in (value, loc, weights)]
        with use_backend(backend):
            out = fn(inputs[0], shapes, starts, inputs[1], inputs[2])
            return torch.autograd.grad(out, inputs, grad_out)

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [grads() for _ in range(5)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)
    expected = reference64((grad_out, value, shapes, starts, loc, weights), softmax)
    for fixed, floating, r in zip(runs[0], grads(), expected):
        assert rel_err(fixed, r) < TOLERANCE[dtype][1]
        assert rel_err(floating, fixed) < TOLERANCE[dtype][1]
