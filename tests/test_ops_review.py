"""Regression tests from a review of the op layer: higher-order gradients (double backward and
nested torch.func.grad) are right where supported and raise where a kernel cannot provide them,
never silently zero or partial."""
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

import ghostkernels
from tests.backend_params import require
from tests.msda_cases import away_from_pixel_boundaries, make_inputs


class _PassThrough(TorchFunctionMode):
    """Any torch-function mode makes the public ops take the custom-op path (not eager_safe)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _msda_inputs():
    value, shapes, starts, loc, weights = make_inputs(1, [(2, 3), (1, 2)], 2, 2, 2, 2,
                                                      generator=torch.Generator().manual_seed(0))
    return value, shapes, starts, away_from_pixel_boundaries(loc, shapes), weights


def _grid_sample_differentiates_twice() -> bool:
    """Whether this torch differentiates grid_sample's backward (2.14 does; 2.11, the GPU
    machine's, does not: there the reference backend has no second derivative either)."""
    x = torch.rand(1, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    grid = torch.rand(1, 1, 1, 2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(torch.nn.functional.grid_sample(
        x, grid, align_corners=False).sum(), grid, create_graph=True)
    try:
        torch.autograd.grad(g.sum(), x)
    except RuntimeError:
        return False
    return True


def _second_order(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    grads = torch.autograd.grad(fn(*leaves).square().sum(), leaves, create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    return torch.autograd.grad(penalty, leaves)


@pytest.mark.parametrize("path", ["eager", "custom_op"])
@pytest.mark.parametrize("public", ["ms_deform_attn", "ms_deform_attn_softmax"])
def test_msda_double_backward_through_a_kernel_raises_rather_than_giving_zeros(public, path):
    """The C++ kernels' backward has no derivative: a double backward used to return zeros (the
    custom op only warned). It now raises, naming the op; the reference differentiates twice."""
    require("cpu", "ms_deform_attn", torch.float64)
    op = getattr(ghostkernels, public)
    value, shapes, starts, loc, weights = _msda_inputs()

    def fn(v, s, w):
        return op(v, shapes, starts, s, w)

    mode = _PassThrough() if path == "custom_op" else None
    if _grid_sample_differentiates_twice():
        with ghostkernels.use_backend("reference"):
            with mode or warnings.catch_warnings():
                expected = _second_order(fn, (value, loc, weights))
        assert all(g.abs().sum() > 0 for g in expected)
    with ghostkernels.use_backend("cpu"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the custom op's "no autograd kernel" warning
        with pytest.raises(RuntimeError, match="ms_deform_attn.*not differentiable"):
            with mode or warnings.catch_warnings():
                _second_order(fn, (value, loc, weights))
        # first-order gradients under create_graph=True are still the kernels' (unchanged)
        leaves = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
        grads = torch.autograd.grad(fn(*leaves).square().sum(), leaves, create_graph=True)
    with ghostkernels.use_backend("reference"):
        ref = torch.autograd.grad(fn(*leaves).square().sum(), leaves)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_msda_nested_torch_func_grad():
    """torch.func.grad of torch.func.grad: the reference used to fail reading its level tables
    (functorch-wrapped tensors have no storage); the C++ kernel gave zeros, now it raises."""
    value, shapes, starts, loc, weights = _msda_inputs()

    def inner(s):
        return ghostkernels.ms_deform_attn(value, shapes, starts, s, weights).square().sum()

    def outer(s):
        return torch.func.grad(inner)(s).square().sum()

    with ghostkernels.use_backend("reference"):
        leaves = loc.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(inner(leaves), leaves, create_graph=True)
        torch.testing.assert_close(torch.func.grad(inner)(loc), g.detach(), rtol=1e-12,
                                   atol=1e-12)
        if _grid_sample_differentiates_twice():
            nested = torch.func.grad(outer)(loc)
            (expected,) = torch.autograd.grad(g.square().sum(), leaves)
            torch.testing.assert_close(nested, expected, rtol=1e-10, atol=1e-12)
    if ghostkernels.backends.availability("cpu", "cpu").available:
        with ghostkernels.use_backend("cpu"), pytest.raises(RuntimeError,
                                                            match="not differentiable"):
            torch.func.grad(outer)(loc)


def test_depthwise_conv_double_backward_on_the_cpu_backend():
    """The C++ backward kernel used to run under create_graph=True too: its results have no
    derivative, so second-order gradients came out partial (wrong) with only a warning."""
    require("cpu", "depthwise_conv", torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64, generator=gen)
    weight = torch.randn(3, 1, 3, 3, dtype=torch.float64, generator=gen)
    bias = torch.randn(3, dtype=torch.float64, generator=gen)
    for act in ("none", "relu"):
        def fn(a, w, b):
            return ghostkernels.depthwise_conv(a, w, b, stride=2, act=act)

        with ghostkernels.use_backend("reference"):
            expected = _second_order(fn, (x, weight, bias))
        with ghostkernels.use_backend("cpu"), warnings.catch_warnings():
            warnings.simplefilter("error")  # no "autograd kernel was not registered" warning
            got = _second_order(fn, (x, weight, bias))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_ghost_conv_depthwise_double_backward():
    """The reference backward detached everything: first-order gradients taken with
    create_graph=True had no graph, so a gradient penalty was silently missing its terms."""
    gen = torch.Generator().manual_seed(2)
    d = torch.float64
    x = torch.randn(1, 3, 4, 4, dtype=d, generator=gen)
    shapes = ((2, 3, 1, 1), (2,), (2, 1, 3, 3), (2,), (4, 1, 3, 3), (4,))
    params = tuple(torch.randn(shape, dtype=d, generator=gen) for shape in shapes)
    tensors = (x, *params)
    with ghostkernels.use_backend("reference"):
        assert torch.autograd.gradgradcheck(ghostkernels.ghost_conv_depthwise,
                                            [t.clone().requires_grad_() for t in tensors])
        with _PassThrough():  # the custom op's autograd formula as well
            leaves = [t.clone().requires_grad_() for t in tensors]
            (g,) = torch.autograd.grad(ghostkernels.ghost_conv_depthwise(*leaves).square().sum(),
                                       leaves[:1], create_graph=True)
            assert g.requires_grad


def test_backend_for_rejects_a_dtype_that_is_not_a_torch_dtype():
    """backend_for("ms_deform_attn", "cpu", "float32") used to answer "reference" (a wrong
    answer: the cpu backend runs float32) for a dtype given as a string."""
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        ghostkernels.backend_for("ms_deform_attn", "cpu", "float32")


def test_msdeformattn_names_a_non_tensor_argument():
    """A list of level shapes (as RT-DETR's core functions take) used to fail with
    AttributeError: 'list' object has no attribute 'shape'."""
    from ghostkernels.nn import MSDeformAttn

    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=1)
    query, memory = torch.randn(1, 2, 8), torch.randn(1, 8, 8)
    points = torch.rand(1, 2, 2, 2)
    shapes, starts = torch.tensor([[2, 3], [1, 2]]), torch.tensor([0, 6])
    with pytest.raises(TypeError, match="input_spatial_shapes must be a torch.Tensor"):
        attn(query, points, memory, [[2, 3], [1, 2]], starts)
    with pytest.raises(TypeError, match="input_padding_mask must be a torch.Tensor"):
        attn(query, points, memory, shapes, starts, [[False] * 8])
    assert attn(query, points, memory, shapes, starts).shape == (1, 2, 8)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_fused_conv_bn_keeps_the_padding_mode(padding_mode):
    """fused_conv_bn (conv_with) built a zero-padded conv from a reflect/replicate/circular one:
    a wrong answer at the border."""
    from torch import nn

    from ghostkernels import fold

    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-1, 1)
    x = torch.randn(2, 3, 5, 6)
    fused = fold.fused_conv_bn(conv, bn)
    assert fused.padding_mode == padding_mode
    with torch.no_grad():
        torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_msda_under_torch_func_grad(backend):
    """torch.func.grad equals autograd on the backends that support it; the Triton backward (its
    launcher needs plain tensors) raised an obscure 'Cannot access storage of TensorWrapper'."""
    device = require(backend, "ms_deform_attn", torch.float32)
    value, shapes, starts, loc, weights = _msda_inputs()
    value, loc, weights = (t.to(device, torch.float32) for t in (value, loc, weights))

    def loss(v, l, w):
        return ghostkernels.ms_deform_attn(v, shapes, starts, l, w).square().sum()

    with ghostkernels.use_backend(backend):
        if backend == "triton":
            with pytest.raises(NotImplementedError, match="triton backend's backward cannot run "
                                                          "under torch.func"):
                torch.func.grad(loss)(value, loc, weights)
            return
        got = torch.func.grad(loss, argnums=(0, 1, 2))(value, loc, weights)
        leaves = [t.detach().requires_grad_() for t in (value, loc, weights)]
        want = torch.autograd.grad(loss(*leaves), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
