"""ghostkernels.ms_deform_attn: every backend against the float64 reference, gradients,
custom-op registration, torch.compile, and the argument checks."""
import importlib
import random

import pytest
import torch

import ghostkernels
from ghostkernels import use_backend
from ghostkernels.reference.ms_deform_attn import ms_deform_attn_forward as reference_forward
from tests.backend_params import (ALL_BACKENDS, DTYPE_IDS, DTYPES, TOLERANCE, backend_params,
                                  require)
from tests.msda_cases import (away_from_pixel_boundaries, make_inputs, naive_ms_deform_attn,
                              rel_err)

OP = "ms_deform_attn"

# (N, level shapes (h, w), M heads, D channels, Lq queries, P points)
CASES = {
    "basic": (2, [(6, 4), (3, 2)], 2, 4, 5, 2),
    "tiny-1x1-D1-Lq1": (1, [(1, 1)], 1, 1, 1, 1),
    "L5-odd-D5": (3, [(5, 7), (3, 3), (2, 1), (1, 1), (4, 2)], 3, 5, 4, 3),
    "P8-D32": (1, [(8, 8), (4, 4), (2, 2)], 2, 32, 3, 8),
    "tall-D7": (2, [(9, 5)], 1, 7, 2, 1),
}


def random_case(rng: random.Random):
    L = rng.randint(1, 5)
    shapes = [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(L)]
    return (rng.randint(1, 3), shapes, rng.randint(1, 3), rng.choice([1, 3, 8, 13, 32]),
            rng.randint(1, 6), rng.randint(1, 8))


def _case(name, seed):
    return random_case(random.Random(seed)) if name == "random" else CASES[name]


CASE_NAMES = list(CASES) + ["random"]


def run(backend, *args):
    with use_backend(backend):
        return ghostkernels.ms_deform_attn(*args)


def test_reference_matches_naive_definition():
    for name in CASE_NAMES:
        args = make_inputs(*_case(name, 0))
        assert rel_err(reference_forward(*args), naive_ms_deform_attn(*args)) < 1e-12, name


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_forward_matches_reference(backend, dtype, case, _fresh_seed):
    device = require(backend, OP, dtype)
    args = make_inputs(*_case(case, _fresh_seed), dtype=dtype, device=device)
    out = run(backend, *args)
    assert out.dtype == dtype and out.device.type == device
    assert torch.isfinite(out).all()
    ref = reference_forward(*[a.double().cpu() if a.is_floating_point() else a.cpu() for a in args])
    assert rel_err(out, ref) < TOLERANCE[dtype][0]


@pytest.mark.parametrize("case", ["basic", "L5-odd-D5", "P8-D32", "random"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradients_match_reference(backend, dtype, case, _fresh_seed):
    device = require(backend, OP, dtype)
    value, shapes, starts, loc, weights = make_inputs(*_case(case, _fresh_seed), dtype=dtype,
                                                      device=device)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3],
                           dtype=torch.float64)
    inputs = [t.detach().requires_grad_() for t in (value, loc, weights)]
    with use_backend(backend):  # the backward resolves its backend when it runs
        out = ghostkernels.ms_deform_attn(inputs[0], shapes, starts, inputs[1], inputs[2])
        grads = torch.autograd.grad(out, inputs, grad_out.to(device=device, dtype=dtype))
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in (value, loc, weights)]
    ref_out = reference_forward(ref_inputs[0], shapes.cpu(), starts.cpu(), ref_inputs[1],
                                ref_inputs[2])
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out)
    for name, g, r, t in zip(("value", "sampling_locations", "attention_weights"), grads,
                             ref_grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert rel_err(g, r) < TOLERANCE[dtype][1], name


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_gradcheck_float64(backend):
    require(backend, OP, torch.float64)
    for name in ("basic", "L5-odd-D5"):
        value, shapes, starts, loc, weights = make_inputs(*CASES[name])
        loc = away_from_pixel_boundaries(loc, shapes)
        inputs = [t.requires_grad_() for t in (value, loc, weights)]
        with use_backend(backend):
            assert torch.autograd.gradcheck(
                lambda v, l, w: ghostkernels.ms_deform_attn(v, shapes, starts, l, w), inputs)


def _border_locations(shapes, N, Lq, M, P):
    """Locations whose pixel coordinates (loc*size - 0.5) fall exactly on pixel centres, on the
    map edges (0 and size-1), on the skip boundary (-1 and size) and far outside."""
    L = len(shapes)
    loc = torch.empty(N, Lq, M, L, P, 2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    for lvl, (h, w) in enumerate(shapes):
        for axis, size in ((0, w), (1, h)):
            pix = torch.tensor([-1.0, -0.5, 0.0, size - 1.0, size - 0.5, float(size), 0.25 * size,
                                -3.0, size + 2.0])
            idx = torch.randint(0, len(pix), (N, Lq, M, P), generator=gen)
            loc[:, :, :, lvl, :, axis] = (pix[idx] + 0.5) / size
    return loc


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_points_on_borders_corners_and_outside(backend, dtype):
    device = require(backend, OP, dtype)
    shapes = [(4, 8), (2, 2), (1, 1)]
    value, spatial_shapes, starts, _, weights = make_inputs(2, shapes, 2, 3, 7, 4, dtype=dtype,
                                                            device=device)
    loc = _border_locations(shapes, 2, 7, 2, 4).to(device=device, dtype=dtype)
    out = run(backend, value, spatial_shapes, starts, loc, weights)
    ref = naive_ms_deform_attn(value, spatial_shapes, starts, loc, weights)
    assert rel_err(out, ref) < TOLERANCE[dtype][0]


def _non_finite_locations(loc):
    """``loc`` with a third of its points given an x and/or y of +inf, -inf, NaN or half the
    dtype's largest value (whose pixel coordinate ``loc * size`` overflows to inf), and the mask
    ``[N, Lq, M, L, P]`` of those points."""
    gen = torch.Generator().manual_seed(2)
    shape = loc.shape[:-1]
    bad = torch.rand(shape, generator=gen) < 1 / 3
    bad.view(-1)[:2] = True
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"),
                             torch.finfo(loc.dtype).max / 2], dtype=loc.dtype)
    which = specials[torch.randint(0, 4, (*shape, 2), generator=gen)]
    axes = torch.randint(0, 3, shape, generator=gen)  # 0: x, 1: y, 2: both
    hit = torch.stack([axes != 1, axes != 0], dim=-1) & bad[..., None]
    return torch.where(hit.to(loc.device), which.to(loc.device), loc), bad


@pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_finite_locations_sample_nothing(backend, dtype, softmax):
    """A point at a location of +-inf or NaN (or one whose pixel coordinate overflows) lies
    outside every map: it contributes zero, as the compiled kernels define it, and its location
    gradient is zero; value and weight gradients stay finite. The reference used to give NaN
    (grid_sample computes NaN corner weights for such a point); every backend must equal the
    float64 reference on the same inputs. (The Triton kernel gave NaN too: its fractions of a
    non-finite pixel coordinate, inf - floor(inf), times its masked zero corners.)"""
    device = require(backend, OP, dtype)
    value, shapes, starts, loc, weights = make_inputs(1, [(3, 4), (2, 2)], 2, 3, 4, 3,
                                                      dtype=dtype, device=device)
    loc, bad = _non_finite_locations(loc)
    fn = ghostkernels.ms_deform_attn_softmax if softmax else ghostkernels.ms_deform_attn
    grad_out = torch.randn(1, 4, 6, dtype=torch.float64)

    def with_grads(backend, tensors):
        inputs = [t.detach().clone().requires_grad_() for t in tensors]
        with use_backend(backend):
            out = fn(inputs[0], shapes.cpu(), starts.cpu(), inputs[1], inputs[2])
            grads = torch.autograd.grad(out, inputs, grad_out.to(out))
        return out, grads

    out, grads = with_grads(backend, (value, loc, weights))
    ref, ref_grads = with_grads("reference", [t.double().cpu() for t in (value, loc, weights)])
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    assert rel_err(out, ref) < TOLERANCE[dtype][0]
    if not softmax:
        naive = naive_ms_deform_attn(value, shapes.cpu(), starts.cpu(), loc, weights)
        assert rel_err(ref, naive) < 1e-12
    for name, g, r in zip(("value", "sampling_locations", "attention_weights"), grads,
                          ref_grads):
        assert torch.isfinite(g).all() and torch.isfinite(r).all(), name
        assert rel_err(g, r) < TOLERANCE[dtype][1], name
    assert (grads[1][bad.to(device)] == 0).all() and (ref_grads[1][bad] == 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_inputs(backend):
    device = require(backend, OP, torch.float32)
    N, shapes, M, D, Lq, P = CASES["basic"]
    value, spatial_shapes, starts, loc, weights = make_inputs(N, shapes, M, D, Lq, P,
                                                              dtype=torch.float32, device=device)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    loc_nc = torch.stack([loc, loc], dim=-1)[..., 0]  # strided view
    weights_nc = weights.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or weights_nc.is_contiguous())
    out = run(backend, value_nc, spatial_shapes, starts, loc_nc, weights_nc)
    ref = reference_forward(value.double(), spatial_shapes, starts, loc.double(), weights.double())
    assert rel_err(out, ref) < TOLERANCE[torch.float32][0]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_float32_locations_with_half_values(backend):
    device = require(backend, OP, torch.float16)
    value, shapes, starts, loc, weights = make_inputs(*CASES["basic"], device=device)
    out = run(backend, value.half(), shapes, starts, loc.float(), weights.half())
    ref = reference_forward(value.half().double(), shapes, starts, loc.float().double(),
                            weights.half().double())
    assert out.dtype == torch.float16
    assert rel_err(out, ref) < TOLERANCE[torch.float16][0]


def test_empty_batch_and_queries():
    value, shapes, starts, loc, weights = make_inputs(*CASES["basic"])
    out = ghostkernels.ms_deform_attn(value[:0], shapes, starts, loc[:0], weights[:0])
    assert out.shape == (0, loc.shape[1], value.shape[2] * value.shape[3])
    out = ghostkernels.ms_deform_attn(value, shapes, starts, loc[:, :0], weights[:, :0])
    assert out.shape == (value.shape[0], 0, value.shape[2] * value.shape[3])


@pytest.mark.parametrize("tables_on", ["cpu", "meta"])
def test_meta_tensors_give_shapes(tables_on):
    """On the meta device (shape inference, models built under ``torch.device("meta")``) the op
    gives the output's shape and dtype, and empty gradients of the inputs' shapes, as ghost_conv
    does, with the level tables on the CPU or on the meta device (which cannot be read)."""
    value, shapes, starts, loc, weights = make_inputs(*CASES["basic"])
    value, loc, weights = (t.to("meta") for t in (value, loc, weights))
    shapes, starts = shapes.to(tables_on), starts.to(tables_on)
    leaves = [t.requires_grad_() for t in (value, loc, weights)]
    for op in (ghostkernels.ms_deform_attn, ghostkernels.ms_deform_attn_softmax):
        out = op(leaves[0], shapes, starts, *leaves[1:])
        assert out.is_meta and out.dtype == value.dtype
        assert out.shape == (value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
        grads = torch.autograd.grad(out.sum(), leaves)
        assert [g.shape for g in grads] == [t.shape for t in leaves]


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_opcheck(backend):
    require(backend, OP, torch.float64)
    value, shapes, starts, loc, weights = make_inputs(*CASES["basic"])
    with use_backend(backend):
        torch.library.opcheck(torch.ops.ghostkernels.ms_deform_attn.default,
                              (value.requires_grad_(), shapes, starts, loc.requires_grad_(),
                               weights.requires_grad_()))


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_torch_compile_fullgraph(backend):
    require(backend, OP, torch.float32)
    value, shapes, starts, loc, weights = make_inputs(*CASES["basic"], dtype=torch.float32)

    def f(v, l, w):
        return ghostkernels.ms_deform_attn(v * 2.0, shapes, starts, l, w.softmax(-1)).sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with use_backend(backend):
        v = value.clone().requires_grad_()
        out = compiled(v, loc, weights)
        out.sum().backward()
        v2 = value.clone().requires_grad_()
        expected = f(v2, loc, weights)
        expected.sum().backward()
    assert rel_err(out, expected) < 1e-6
    assert rel_err(v.grad, v2.grad) < 1e-6


@pytest.mark.parametrize("backend", backend_params("cuda", "triton"))
@pytest.mark.gpu
def test_large_tensor_offsets_do_not_overflow_int32(backend):
    """value with more than 2**31 elements: offsets must be 64-bit (GPU only: ~4.3 GB fp16)."""
    device = require(backend, OP, torch.float16)
    if device != "cuda":
        pytest.skip("needs the tensors on a GPU")
    h, w, M, D = 2900, 2900, 8, 32  # 8.41M positions x 256 channels = 2.15e9 elements
    value = torch.randn(1, h * w, M, D, device=device, dtype=torch.float16)
    shapes = torch.tensor([[h, w]], device=device)
    starts = torch.zeros(1, dtype=torch.int64, device=device)
    loc = torch.rand(1, 4, M, 1, 2, 2, device=device) * 0.02 + 0.975  # the far end of the map
    weights = torch.rand(1, 4, M, 1, 2, device=device, dtype=torch.float16)
    out = run(backend, value, shapes, starts, loc, weights)
    ref = naive_ms_deform_attn(value, shapes.cpu(), starts.cpu(), loc, weights)
    assert rel_err(out, ref) < TOLERANCE[torch.float16][0]


# ------------------------------------------------------------------------------------------
# Argument checks: errors name the argument, what was expected and what came.


def _good():
    return list(make_inputs(*CASES["basic"], dtype=torch.float32))


@pytest.mark.parametrize("index,bad,exc,words", [
    (0, lambda a: a[0][0], ValueError, ["value", "4-d", "[N, S, M, D]"]),
    (1, lambda a: a[1].float(), TypeError, ["spatial_shapes", "int64", "float32"]),
    (2, lambda a: a[2].int(), TypeError, ["level_start_index", "int64", "int32"]),
    (3, lambda a: a[3][:1], ValueError, ["sampling_locations", "batch"]),
    (3, lambda a: a[3][:, :, :1], ValueError, ["sampling_locations", "heads"]),
    (3, lambda a: a[3][:, :, :, :1], ValueError, ["sampling_locations", "levels"]),
    (3, lambda a: a[3][..., :1], ValueError, ["sampling_locations", "(x, y)"]),
    (4, lambda a: a[4][..., :1], ValueError, ["attention_weights", "[N, Lq, M, L, P]"]),
    (4, lambda a: a[4].double(), TypeError, ["attention_weights", "float32", "float64"]),
    (3, lambda a: a[3].half(), TypeError, ["sampling_locations", "float16"]),
    (0, lambda a: a[0].tolist(), TypeError, ["value", "torch.Tensor", "list"]),
    (1, lambda a: torch.tensor([[6, 4], [3, 3]]), ValueError, ["spatial_shapes", "sum to 33"]),
    (1, lambda a: torch.tensor([[6, 4], [0, 6]]), ValueError, ["spatial_shapes[1]", "positive"]),
    (2, lambda a: torch.tensor([0, 23]), ValueError, ["level_start_index", "[0, 24]"]),
    (2, lambda a: a[2][:1], ValueError, ["level_start_index", "levels"]),
    (1, lambda a: a[1][:, :1], ValueError, ["spatial_shapes", "(h, w)"]),
])
def test_bad_input_is_rejected_with_a_clear_message(index, bad, exc, words):
    args = _good()
    args[index] = bad(args)
    with pytest.raises(exc) as info:
        ghostkernels.ms_deform_attn(*args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.gpu
def test_device_mismatch_is_rejected():
    args = _good()
    args[3] = args[3].cuda()
    with pytest.raises(ValueError, match="sampling_locations must be on the device of value"):
        ghostkernels.ms_deform_attn(*args)


def test_forced_backend_that_cannot_run_raises():
    args = _good()
    with use_backend("cuda"):
        if ghostkernels.backends.availability("cuda", "cpu").available:
            pytest.fail("the cuda backend must refuse CPU tensors")
        with pytest.raises(ghostkernels.BackendUnavailableError, match="cuda.*cpu"):
            ghostkernels.ms_deform_attn(*args)
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("fast"):
            pass


def test_level_checks_are_not_skipped_for_a_new_tensor_with_a_reused_address():
    """The cache of level tables read from the device must not trust a new tensor whose key
    (address, version counter, shape) equals that of a tensor read before: a freed tensor's memory
    is reused."""
    reference = importlib.import_module("ghostkernels.reference.ms_deform_attn")
    args = _good()
    ghostkernels.ms_deform_attn(*args)  # checks args[1], args[2] and caches their host copies
    bad = torch.tensor([0, 23])
    key = (args[1].data_ptr(), args[1]._version, tuple(args[1].shape), args[1].device,
           bad.data_ptr(), bad._version, tuple(bad.shape))
    # what the cache would hold had a checked tensor lived at bad's address before
    good_key = (args[1].data_ptr(), args[1]._version, tuple(args[1].shape), args[1].device,
                args[2].data_ptr(), args[2]._version, tuple(args[2].shape))
    reference._level_lists[key] = reference._level_lists[good_key]
    with pytest.raises(ValueError, match="level_start_index"):
        ghostkernels.ms_deform_attn(args[0], args[1], bad, args[3], args[4])


def test_away_from_pixel_boundaries_moves_only_near_kinks():
    shapes = torch.tensor([[4, 8], [1, 1]])
    pixels = torch.tensor([[2.0 + 1e-6, 1.5], [3.0 - 2e-4, 0.25]], dtype=torch.float64)  # (x, y)
    loc = torch.empty(1, 1, 1, 2, 2, 2, dtype=torch.float64)
    for lvl, (h, w) in enumerate(shapes.tolist()):
        loc[0, 0, 0, lvl] = (pixels + 0.5) / torch.tensor([w, h], dtype=torch.float64)
    moved = away_from_pixel_boundaries(loc, shapes)
    for lvl, (h, w) in enumerate(shapes.tolist()):
        pix = moved[0, 0, 0, lvl] * torch.tensor([w, h], dtype=torch.float64) - 0.5
        assert ((pix - pix.round()).abs() >= 1e-3 - 1e-12).all(), pix
        assert (pix - pixels).abs().max() < 3e-3
        assert pix[0, 1] == 1.5 and pix[1, 1] == 0.25  # already clear: unchanged
