"""Internals of the Triton ms_deform_attn backend: launch configuration, the multi-block code
paths (partial query blocks, D split over programs / looped in chunks), exact border points.

Runs on CUDA or, without a GPU, through the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1). Everything is compared with the float64 grid_sample reference.
"""
import itertools

import pytest
import torch

import ghostkernels
from ghostkernels.ops.ms_deform_attn import fixed_point_scale
from ghostkernels.reference import ms_deform_attn as reference
from ghostkernels.triton import ms_deform_attn as tms
from tests.backend_params import rel_err as rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-2), torch.bfloat16: (1.5e-2, 5e-2)}


def levels(shapes):
    shapes = torch.tensor(shapes, dtype=torch.int64, device=DEVICE)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return shapes, starts, int(sizes.sum())


def random_problem(N, Lq, M, D, shapes, P, dtype):
    shapes, starts, S = levels(shapes)
    L = shapes.shape[0]
    value = torch.randn(N, S, M, D, device=DEVICE).to(dtype)
    # [-0.1, 1.1]: some points fall partly or wholly outside their level.
    loc = torch.rand(N, Lq, M, L, P, 2, device=DEVICE) * 1.2 - 0.1
    weights = torch.rand(N, Lq, M, L, P, device=DEVICE).to(dtype)
    return value, shapes, starts, loc, weights


def reference64(value, shapes, starts, loc, weights, grad_out, softmax=False):
    args = (value.double(), shapes, starts, loc.double(), weights.double())
    return (reference.forward(*args, softmax=softmax),
            *reference.backward(grad_out.double(), *args, softmax=softmax))


def assert_matches(value, shapes, starts, loc, weights, fwd_config=None, bwd_config=None,
                   softmax=False, fixed_point=False):
    """Triton forward and backward against the float64 reference; ``softmax``: the weights are
    logits; ``fixed_point``: grad_value through the deterministic int64 path."""
    if fwd_config is None:
        out = tms.forward(value, shapes, starts, loc, weights, softmax=softmax)
    else:
        out = tms._launch_forward(value, shapes, starts, loc, weights, fwd_config, softmax)
    grad_out = torch.randn(out.shape, device=DEVICE).to(value.dtype)
    scale = (fixed_point_scale(grad_out, weights, loc.shape[1], loc.shape[4], softmax)
             if fixed_point else None)
    if bwd_config is None:
        grads = tms.backward(grad_out, value, shapes, starts, loc, weights, softmax, scale)
    else:
        grads = tms._launch_backward(grad_out, value, shapes, starts, loc, weights, bwd_config,
                                     softmax, scale)
    assert out.dtype == value.dtype and out.shape == (value.shape[0], loc.shape[1],
                                                      value.shape[2] * value.shape[3])
    fwd_tol, grad_tol = TOL[value.dtype]
    expected = reference64(value, shapes, starts, loc, weights, grad_out, softmax)
    names = ("out", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    for name, got, ref, tol in zip(names, (out, *grads), expected, (fwd_tol,) + (grad_tol,) * 3):
        assert got.shape == ref.shape, name
        assert torch.isfinite(got).all(), name
        assert rel(got, ref) < tol, f"{name}: rel {rel(got, ref):.3e} >= {tol}"


# --------------------------------------------------------------------------------------------
# launch_config


@pytest.mark.parametrize("D", [1, 3, 32, 71, 128, 1025])
@pytest.mark.parametrize("N,Lq", [(1, 1), (1, 300), (32, 300), (2, 22223)])
def test_launch_config_blocks_are_powers_of_two_that_fit_the_tile(N, Lq, D):
    for tile in (tms.FORWARD_TILE, tms.BACKWARD_TILE):
        cfg = tms.launch_config(N, Lq, 8, D, num_sms=132, tile=tile)
        for block in (cfg.block_q, cfg.block_d):
            assert block >= 1 and block & (block - 1) == 0
        assert cfg.block_d >= min(D, tms.MAX_BLOCK_D) and cfg.block_d < 2 * max(D, 1)
        assert cfg.block_q * cfg.block_d <= tile
        assert cfg.block_q < 2 * Lq  # never more than one power of two beyond the queries
        assert 1 <= cfg.num_warps <= 8
        # at most ELEMENTS_PER_THREAD tile elements per thread (more spills registers on sm_90)
        assert cfg.block_q * cfg.block_d <= 32 * cfg.num_warps * tms.ELEMENTS_PER_THREAD


def test_launch_config_fills_the_gpu_at_batch_one():
    # RT-DETR decoder, batch 1: 300 queries x 8 heads of 32 channels on a 132-SM H100.
    cfg = tms.launch_config(1, 300, 8, 32, num_sms=132, tile=tms.FORWARD_TILE)
    programs = -(-300 // cfg.block_q) * 8
    assert programs >= 2 * 132
    # A large batch keeps the full tile.
    big = tms.launch_config(32, 300, 8, 32, num_sms=132, tile=tms.FORWARD_TILE)
    assert big.block_q == min(tms.MAX_BLOCK_Q, tms.FORWARD_TILE // 32)


# --------------------------------------------------------------------------------------------
# Code paths the default configuration does not reach on tiny shapes


def test_partial_query_blocks_and_channel_chunks():
    """BLOCK_Q=2 over 3 queries (a partial block); BLOCK_D=4 over D=6: the forward splits D over
    two programs, the backward loops over two chunks, the second one partial."""
    problem = random_problem(2, 3, 1, 6, [(3, 4), (2, 2)], 2, torch.float32)
    config = tms.LaunchConfig(block_q=2, block_d=4, num_warps=1)
    assert_matches(*problem, fwd_config=config, bwd_config=config)


@pytest.mark.parametrize("softmax,fixed_point", [(True, False), (False, True), (True, True)])
def test_softmax_and_fixed_point_over_partial_blocks_and_chunks(softmax, fixed_point):
    """The softmax passes (stats, then the logit-gradient pass after the barrier) and the int64
    grad_value on the same multi-block layout: partial query block, D split / chunked."""
    value, shapes, starts, loc, weights = random_problem(2, 3, 2, 6, [(3, 4), (2, 2)], 3,
                                                         torch.float32)
    logits = torch.randn(weights.shape, device=DEVICE) * 3.0 if softmax else weights
    config = tms.LaunchConfig(block_q=2, block_d=4, num_warps=1)
    assert_matches(value, shapes, starts, loc, logits, fwd_config=config, bwd_config=config,
                   softmax=softmax, fixed_point=fixed_point)


@pytest.mark.parametrize("N,Lq,M,D,shapes,P,dtype", [
    (1, 1, 1, 1, [(1, 1)], 1, torch.float32),  # Lq=1, D=1, a 1x1 level
    (1, 2, 1, 5, [(1, 1), (2, 3), (5, 1), (1, 4), (3, 3)], 8, torch.float32),  # L=5, P=8
    (2, 9, 2, 12, [(6, 5), (3, 3), (1, 1)], 2, torch.float16),
    (1, 4, 3, 24, [(4, 3), (2, 2)], 3, torch.bfloat16),
])
def test_edge_shapes(N, Lq, M, D, shapes, P, dtype):
    assert_matches(*random_problem(N, Lq, M, D, shapes, P, dtype))


def test_points_exactly_on_borders_corners_and_outside():
    """Pixel coordinates on every border case: outside (-1.5, W+0.5), exactly -1 and W (zero
    contribution; at -1 grid_sample still gives a location gradient), pixel centres 0 and W-1,
    the map edges -0.5 and W-0.5. Sizes are powers of two so that the locations are exact."""
    shapes, starts, S = levels([(4, 2), (1, 1), (2, 4)])
    M, D, P = 2, 3, 1

    def locs(size):  # normalised locations whose pixel coordinate loc*size-0.5 is exact
        return [(px + 0.5) / size for px in (-1.5, -1.0, -0.5, 0.0, 0.25, size - 1.0,
                                                size - 0.5, size, size + 0.5)]

    per_level = [list(itertools.product(locs(int(w)), locs(int(h)))) for h, w in shapes.tolist()]
    Lq = max(len(p) for p in per_level)
    loc = torch.empty(1, Lq, M, len(per_level), P, 2, device=DEVICE)
    for lvl, points in enumerate(per_level):
        pts = torch.tensor(points, device=DEVICE)
        loc[0, :, :, lvl, 0] = pts[torch.arange(Lq) % len(points)][:, None]
    value = torch.randn(1, S, M, D, device=DEVICE)
    weights = torch.rand(1, Lq, M, len(per_level), P, device=DEVICE)
    assert_matches(value, shapes, starts, loc, weights)


# --------------------------------------------------------------------------------------------
# Through the public op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_public_op_forward_and_backward_run_on_triton(dtype):
    value, shapes, starts, loc, weights = random_problem(2, 3, 2, 5, [(4, 5), (2, 3)], 3, dtype)
    inputs = [t.clone().requires_grad_() for t in (value, loc, weights)]
    grad_out = torch.randn(value.shape[0], 3, 10, device=DEVICE).to(dtype)
    with ghostkernels.use_backend("triton"):  # the backward resolves its backend when it runs
        out = ghostkernels.ms_deform_attn(inputs[0], shapes, starts, inputs[1], inputs[2])
        out.backward(grad_out)
    expected = reference64(value, shapes, starts, loc, weights, grad_out)
    fwd_tol, grad_tol = TOL[dtype]
    assert out.dtype == dtype and rel(out, expected[0]) < fwd_tol
    for t, ref in zip(inputs, expected[1:]):
        assert t.grad.dtype == t.dtype and rel(t.grad, ref) < grad_tol
