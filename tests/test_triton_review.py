"""Regressions found reviewing the Triton backend against the reference backend.

NaN through the activations: ``tl.maximum(x, 0.0)`` defaults to ``propagate_nan=NONE``
(``maxnumf``), so the Triton kernels' ReLU (and the SE block's hard-sigmoid clamp) turned NaN into
0 where ``torch.relu`` / ``F.hardsigmoid`` (the reference, the C++ CPU and CUDA kernels) keep it:
a NaN input gave finite, wrong outputs on the Triton backend only.
"""
import pytest
import torch

import ghostkernels
from ghostkernels import use_backend
from tests.backend_params import require

NAN, INF = float("nan"), float("inf")
FORMATS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])


def _run(backend, fn, *tensors):
    with use_backend(backend):
        return fn(*tensors)


def assert_same_non_finite_and_close(fn, *tensors, tol=1e-5):
    """Triton's output has NaN / inf exactly where the float64 reference's has them, and the
    finite entries agree to ``tol`` relative (max-norm)."""
    out = _run("triton", fn, *tensors)
    ref = _run("reference", fn, *(t.double() for t in tensors))
    assert out.shape == ref.shape
    assert torch.equal(out.isnan(), ref.isnan()), "NaN pattern differs"
    assert torch.equal(out.isinf(), ref.isinf()), "inf pattern differs"
    assert ref.isnan().any()  # the case is meaningful
    fin = ref.isfinite()
    assert torch.equal(out[out.isinf()], ref[ref.isinf()].to(out.dtype))
    err = (out[fin].double() - ref[fin]).abs().max() / ref[fin].abs().max().clamp_min(1e-30)
    assert err < tol


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@FORMATS
def test_depthwise_conv_relu_keeps_nan(channels_last):
    device = require("triton", "depthwise_conv", torch.float32)
    g = _gen()
    x = torch.randn(2, 3, 6, 5, generator=g)
    x[0, 1, 2, 2] = NAN
    w = torch.randn(3, 1, 3, 3, generator=g)
    b = torch.randn(3, generator=g)
    b[2] = NAN  # a NaN bias makes its whole channel NaN, ReLU or not
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x, w, b = x.to(device), w.to(device), b.to(device)
    assert_same_non_finite_and_close(
        lambda x, w, b: ghostkernels.depthwise_conv(x, w, b, 2, "relu"), x, w, b)


@FORMATS
def test_ghost_conv_relus_keep_nan(channels_last):
    device = require("triton", "ghost_conv", torch.float32)
    g = _gen(1)
    x = torch.randn(2, 3, 5, 6, generator=g)
    x[1, 0, 2, 3] = NAN  # x1 NaN at one pixel (all channels), x2 NaN on its 3x3 neighbourhood
    wp, bp = torch.randn(4, 3, 1, 1, generator=g), torch.randn(4, generator=g)
    wc, bc = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = [t.to(device) for t in (x, wp, bp, wc, bc)]
    assert_same_non_finite_and_close(
        lambda x, wp, bp, wc, bc: ghostkernels.ghost_conv(x, wp, bp, wc, bc, "relu", "relu", 7),
        *args)


def test_ghost_conv_depthwise_relus_keep_nan():
    device = require("triton", "ghost_conv_depthwise", torch.float32)
    g = _gen(2)
    x = torch.randn(1, 3, 7, 6, generator=g)
    x[0, 2, 3, 1] = NAN
    wp, bp = torch.randn(4, 3, 1, 1, generator=g), torch.randn(4, generator=g)
    wc, bc = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, generator=g)
    wd, bd = torch.randn(6, 1, 3, 3, generator=g), torch.randn(6, generator=g)
    bd[5] = NAN  # the depthwise conv's own ReLU
    args = [t.to(device) for t in (x, wp, bp, wc, bc, wd, bd)]
    assert_same_non_finite_and_close(
        lambda x, wp, bp, wc, bc, wd, bd: ghostkernels.ghost_conv_depthwise(
            x, wp, bp, wc, bc, wd, bd, "relu", "relu", 6, stride=2, act_dw="relu"), *args)


@pytest.mark.parametrize("where", ["pooled_nan", "pooled_inf", "b_expand_nan"])
def test_se_excitation_keeps_nan(where):
    device = require("triton", "se_excitation", torch.float32)
    g = _gen(3)
    pooled = torch.randn(3, 5, generator=g)
    wr, br = torch.randn(3, 5, generator=g), torch.randn(3, generator=g)  # R = 3: masked rows
    we, be = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    if where == "pooled_nan":
        pooled[0, 1] = NAN
    elif where == "pooled_inf":  # 0 * inf in the masked hidden rows must not leak NaN
        pooled[1, 2] = INF
    else:
        be[3] = NAN
    args = [t.to(device) for t in (pooled, wr, br, we, be)]
    assert_same_non_finite_and_close(ghostkernels.se_excitation, *args)


def test_ghost_conv_row_kernel_relus_keep_nan():
    """The row kernel (``GhostLaunchConfig``: benchmark sweeps, tests) has its own ReLUs."""
    device = require("triton", "ghost_conv", torch.float32)
    from ghostkernels.reference import ghost_conv as reference
    from ghostkernels.triton import ghost_conv as triton_ghost
    g = _gen(4)
    x = torch.randn(1, 3, 5, 6, generator=g)
    x[0, 1, 2, 2] = NAN
    args = [x, torch.randn(4, 3, generator=g), torch.randn(4, generator=g),
            torch.randn(4, 9, generator=g), torch.randn(4, generator=g)]
    args = [t.to(device) for t in args] + [True, True, 7]
    y = triton_ghost.forward(*args, config=triton_ghost.default_config(6, False))
    ref = reference.forward(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    assert ref.isnan().any()
    assert torch.equal(y.isnan(), ref.isnan())
    fin = ref.isfinite()
    assert torch.allclose(y[fin].double(), ref[fin], rtol=1e-5, atol=1e-5)
