"""The C++ CPU depthwise-conv kernels (csrc/cpu/depthwise_planes.h): the NCHW forward and the
backward (grad x, weight, bias) against a float64 F.conv2d computation, over random geometries and
the cases that exercise the kernels' own structure (planes grouped across the batch, the forward's
row blocks, stride-2 phase planes, kernels wider than the map), and that the op's eager backward
runs them."""
import random

import pytest
import torch
import torch.nn.functional as F

import ghostkernels
from ghostkernels import backends, use_backend
from tests.backend_params import rel_err, require


@pytest.fixture(autouse=True)
def _cpu_backend():
    require("cpu", "depthwise_conv", torch.float32)  # skips (or fails in CI) without the build


def kernel_ops():
    backends.compiled_extension()
    return torch.ops.ghostkernels_C


def definition(x, weight, bias, stride, relu, grad_y):
    """y and (grad x, grad weight, grad bias) of act(dwconv(x) + bias) by F.conv2d in float64."""
    x, weight, bias = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    kh, kw = weight.shape[2:]
    y = F.conv2d(x, weight, bias, stride=stride, padding=(kh // 2, kw // 2), groups=x.shape[1])
    if relu:
        y = F.relu(y)
    return y.detach(), torch.autograd.grad(y, (x, weight, bias), grad_y.double())


def geometry(rng):
    """(B, C, H, W, kh, kw, stride, relu, channels_last) with maps of 1..15 (kernel wider than
    the map included)."""
    return (rng.randint(1, 4), rng.randint(1, 6), rng.randint(1, 15), rng.randint(1, 15),
            rng.choice([1, 3, 5]), rng.choice([1, 3, 5]), rng.choice([1, 2]),
            rng.random() < 0.5, rng.random() < 0.25)


STRUCTURE_CASES = {
    # (B, C, H, W, kh, kw, stride): what of the kernels' structure the case reaches
    "planes-grouped-across-the-batch": (3, 2, 150, 151, 3, 3, 1),   # 2 + 1 planes per group
    "one-plane-per-group-stride-2": (2, 1, 260, 255, 5, 5, 2),
    "forward-row-blocks": (1, 3, 97, 90, 3, 5, 1),                  # 4096 / 94 -> 43-row blocks
    "5x5-on-a-1x1-map": (5, 4, 1, 1, 5, 5, 1),
    "1x5-dfc-on-a-1-wide-map": (8, 3, 1, 1, 1, 5, 1),
    "5x1-stride-2-on-an-odd-map": (2, 3, 7, 3, 5, 1, 2),
}


def check_case(B, C, H, W, kh, kw, stride, relu, channels_last, dtype, tol, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    weight = torch.randn(C, 1, kh, kw, generator=gen, dtype=torch.float64)
    bias = torch.randn(C, generator=gen, dtype=torch.float64)
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    grad_y = torch.randn(B, C, Ho, Wo, generator=gen, dtype=torch.float64)
    # the definition sees what the kernel gets: the inputs rounded to the dtype
    x, weight, bias, grad_y = (t.to(dtype).double() for t in (x, weight, bias, grad_y))
    y_ref, grads_ref = definition(x, weight, bias, stride, relu, grad_y)
    xk = x.to(dtype)
    if channels_last:
        xk = xk.contiguous(memory_format=torch.channels_last)
    w_flat, b = weight.to(dtype).reshape(C, kh * kw).contiguous(), bias.to(dtype)
    ops = kernel_ops()
    y = ops.depthwise_conv_forward(xk, w_flat, b, kh, kw, stride, relu)
    assert y.shape == y_ref.shape
    assert rel_err(y, y_ref) < tol, "forward"
    gx, gw, gb = ops.depthwise_conv_backward(grad_y.to(dtype), xk, w_flat, y if relu else None,
                                             kh, kw, stride, True, True, True)
    assert gx.is_contiguous(memory_format=torch.channels_last if channels_last and C > 1
                            and H * W > 1 else torch.contiguous_format)
    # Each gradient sums signed terms; its rounding error scales with the terms' magnitudes:
    # the same chain rule in absolute values (the ReLU mask kept), >= the gradient's own norm.
    mask = (y_ref > 0) if relu else torch.ones_like(y_ref, dtype=torch.bool)
    _, scales = definition(x.abs(), weight.abs(), bias.abs(), stride, False,
                           (grad_y * mask).abs())
    for name, got, want, scale in zip(("x", "weight", "bias"),
                                      (gx, gw.view(C, 1, kh, kw), gb), grads_ref, scales):
        assert got.dtype == dtype, name
        err = float((got.double() - want).norm() / scale.norm().clamp_min(1e-30))
        assert err < tol, f"grad {name}: {err:.2e} of its terms' scale"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)],
                         ids=["float64", "float32"])
def test_random_geometries_match_the_definition(dtype, tol, _fresh_seed):
    rng = random.Random(_fresh_seed)
    for trial in range(60):
        cfg = geometry(rng)
        check_case(*cfg, dtype=dtype, tol=tol, seed=_fresh_seed + trial)


@pytest.mark.parametrize("name", list(STRUCTURE_CASES))
@pytest.mark.parametrize("relu", [False, True], ids=["none", "relu"])
def test_kernel_structure_cases_match_the_definition(name, relu, _fresh_seed):
    check_case(*STRUCTURE_CASES[name], relu, False, torch.float64, 1e-12, _fresh_seed)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)],
                         ids=["float16", "bfloat16"])
def test_half_types_accumulate_in_float32(dtype, tol, _fresh_seed):
    check_case(3, 5, 13, 11, 3, 5, 2, True, False, dtype, tol, _fresh_seed)


def test_gradients_asked_for_only_are_computed():
    x, w_flat = torch.randn(2, 3, 8, 9), torch.randn(3, 9)
    grad_y = torch.randn(2, 3, 8, 9)
    ops = kernel_ops()
    full = ops.depthwise_conv_backward(grad_y, x, w_flat, None, 3, 3, 1, True, True, True)
    for needs in ((True, False, False), (False, True, False), (False, False, True)):
        part = ops.depthwise_conv_backward(grad_y, x, w_flat, None, 3, 3, 1, *needs)
        for need, got, want in zip(needs, part, full):
            if need:
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            else:
                assert got.numel() == 0


def test_the_eager_backward_runs_the_cpu_kernel(monkeypatch):
    """The op's autograd takes the cpu backend's backward (not the reference formula), and its
    gradients equal the definition's."""
    import ghostkernels.compiled.depthwise_conv as compiled
    calls = []
    kernel_backward = compiled.backward

    def counting(*args, **kwargs):
        calls.append(args[4:8])
        return kernel_backward(*args, **kwargs)

    monkeypatch.setattr(compiled, "backward", counting)
    x = torch.randn(3, 4, 10, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 1, 5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with use_backend("cpu"):
        y = ghostkernels.depthwise_conv(x, weight, bias, 2, "relu")
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_y)
    assert calls == [(5, 3, 2, True)]
    _, want = definition(x, weight, bias, 2, True, grad_y)
    for got, ref in zip(grads, want):
        assert rel_err(got, ref) < 1e-12


def test_backward_kernel_rejects_a_wrong_grad_shape():
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        kernel_ops().depthwise_conv_backward(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 8, 8),
                                             torch.randn(2, 9), None, 3, 3, 1, True, True, True)
