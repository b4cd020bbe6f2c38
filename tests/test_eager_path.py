"""The eager fast path (ghostkernels/ops/eager.py): in plain eager mode the public ops run their
implementation through a plain autograd.Function instead of the torch.library custom op. It must
compute exactly what the custom op computes, forward and backward, and hand over to the custom op
whenever something needs it as one node (dispatch modes, fake tensors, torch.compile)."""
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ghostkernels
from ghostkernels.benchmark import count_ops
from ghostkernels.ops.eager import eager_safe
from tests.backend_params import require
from tests.msda_cases import away_from_pixel_boundaries

OPS = {name: importlib.import_module(f"ghostkernels.ops.{name}") for name in (
    "ms_deform_attn", "ghost_conv", "depthwise_conv", "dfc_gate", "se_excitation")}


def _cases(gen):
    """op name -> (public call, custom op, the custom op's full argument list, tensors to
    differentiate) on fresh random float64 inputs."""
    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    shapes = torch.tensor([[5, 6], [3, 2]])
    starts = torch.tensor([0, 30])
    value = r(2, 36, 2, 3)
    loc = away_from_pixel_boundaries(torch.rand(2, 4, 2, 2, 3, 2, generator=gen,
                                                dtype=torch.float64), shapes)
    weights = torch.rand(2, 4, 2, 2, 3, generator=gen, dtype=torch.float64)
    x = r(2, 5, 7, 6)
    w1, b1, w2, b2 = r(4, 5, 1, 1), r(4), r(4, 1, 3, 3), r(4)
    gate, residual = torch.rand(2, 7, 7, 6, generator=gen, dtype=torch.float64), r(2, 7, 7, 6)
    wp, bp, wh, bh, wv, bv = r(5, 5, 1, 1), r(5), r(5, 1, 1, 5), r(5), r(5, 1, 5, 1), r(5)
    pooled, wr, br, we, be = r(2, 5), r(3, 5, 1, 1), r(3), r(5, 3, 1, 1), r(5)
    bd = r(5)
    return {
        "ms_deform_attn": (
            lambda v, l, a: ghostkernels.ms_deform_attn(v, shapes, starts, l, a),
            lambda v, l, a: OPS["ms_deform_attn"]._ms_deform_attn(v, shapes, starts, l, a, False),
            (value, loc, weights)),
        "ms_deform_attn_softmax": (
            lambda v, l, a: ghostkernels.ms_deform_attn_softmax(v, shapes, starts, l, a),
            lambda v, l, a: OPS["ms_deform_attn"]._ms_deform_attn(v, shapes, starts, l, a, True),
            (value, loc, r(2, 4, 2, 2, 3))),
        "ghost_conv": (  # with every epilogue: the backward recomputes the core output
            lambda x, w1, w2, g, res: ghostkernels.ghost_conv(
                x, w1, b1, w2, b2, out_channels=7, gate=g, residual=res),
            lambda x, w1, w2, g, res: OPS["ghost_conv"]._ghost_conv(
                x, w1.reshape(4, 5), b1, w2.reshape(4, 9), b2, True, True, 7, None, g, res),
            (x, w1, w2, gate, residual)),
        "depthwise_conv": (
            lambda x, w: ghostkernels.depthwise_conv(x, w, bd, 2, "relu"),
            lambda x, w: OPS["depthwise_conv"]._depthwise_conv(x, w.reshape(5, 9), bd, 3, 3, 2,
                                                               True),
            (x, r(5, 1, 3, 3))),
        "dfc_gate": (
            lambda x, wp, wh: ghostkernels.dfc_gate(x, wp, bp, wh, bh, wv, bv),
            lambda x, wp, wh: OPS["dfc_gate"]._dfc_gate(
                x, wp.reshape(5, 5), bp, wh.reshape(5, 5), bh, wv.reshape(5, 5), bv),
            (x, wp, wh)),
        "se_excitation": (
            lambda p, wr: ghostkernels.se_excitation(p, wr, br, we, be),
            lambda p, wr: OPS["se_excitation"]._se_excitation(
                p, wr.reshape(3, 5), br, we.reshape(5, 3), be),
            (pooled, wr)),
    }


CASE_NAMES = list(_cases(torch.Generator().manual_seed(0)))


def _values_and_grads(fn, tensors, grad_seed):
    inputs = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed),
                           dtype=out.dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_the_eager_path_computes_what_the_custom_op_computes(name, backend):
    require(backend, "ghost_conv", torch.float64)  # the cpu backend: the C++ extension
    seed = torch.seed() % 2**31
    public, custom, tensors = _cases(torch.Generator().manual_seed(seed))[name]
    with ghostkernels.use_backend(backend if backend in
                                  ghostkernels.backends.implementations(
                                      name.replace("_softmax", "")) else "reference"):
        assert eager_safe(tensors)
        out, grads = _values_and_grads(public, tensors, seed)
        assert type(out.grad_fn).__name__.endswith("_eager" + "Backward"), (
            f"seed {seed}: the public call did not take the eager path ({out.grad_fn})")
        expected, expected_grads = _values_and_grads(custom, tensors, seed)
    # the same code on the same inputs; CPU kernels may round differently with the alignment of
    # their buffers (SIMD paths), hence not bitwise
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")


def test_under_a_dispatch_mode_the_op_is_one_custom_op_call():
    public, _, tensors = _cases(torch.Generator().manual_seed(1))["ghost_conv"]
    seen = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Recorder():
        assert not eager_safe(tensors)
        public(*tensors)
    assert "ghostkernels.ghost_conv.default" in seen, seen
    assert count_ops(lambda: public(*tensors)) == 1


def test_fake_tensors_take_the_custom_op_and_its_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    public, _, tensors = _cases(torch.Generator().manual_seed(2))["ms_deform_attn"]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # the level tables stay real
        fakes = [mode.from_tensor(t) for t in tensors]
        out = public(*fakes)
    assert out.shape == (2, 4, 6) and out.dtype == torch.float64


def test_subclass_inputs_are_not_eager_safe():
    class Tagged(torch.Tensor):
        pass

    t = torch.zeros(2).as_subclass(Tagged)
    assert not eager_safe((torch.zeros(2), t))
    assert eager_safe((torch.zeros(2), torch.nn.Parameter(torch.zeros(2)), 3, None, "relu"))


def test_the_reference_reads_the_level_tables_from_the_device_once():
    """A CUDA graph cannot capture a device-to-host copy: after one call, the reference (the
    grid_sample baseline) and the op's checks must not read the level tables again."""
    from ghostkernels.reference import ms_deform_attn as reference

    public, _, tensors = _cases(torch.Generator().manual_seed(3))["ms_deform_attn"]
    calls = []
    original = torch.Tensor.tolist

    def counting_tolist(self):
        calls.append(tuple(self.shape))
        return original(self)

    with ghostkernels.use_backend("reference"):
        public(*tensors)  # fills the cache
        torch.Tensor.tolist = counting_tolist
        try:
            out = public(*tensors)
        finally:
            torch.Tensor.tolist = original
    assert calls == [], calls
    torch.testing.assert_close(out, public(*tensors), rtol=1e-12, atol=1e-12)
    # a new version of the table (an in-place change) is read again
    shapes = torch.tensor([[5, 6], [3, 2]])
    starts = torch.tensor([0, 30])
    assert reference.level_lists(shapes, starts) == ([(5, 6), (3, 2)], [0, 30])
    shapes[1, 1] = 1
    assert reference.level_lists(shapes, starts) == ([(5, 6), (3, 1)], [0, 30])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiling_hands_the_compiler_plain_ops_when_the_reference_is_chosen(backend):
    """Under torch.compile an op whose chosen backend is the reference is traced as its plain
    PyTorch ops (the compiler can fuse them); an op with a kernel stays one custom op. Both equal
    eager."""
    require(backend, "ghost_conv", torch.float64)  # the cpu backend: the C++ extension
    from torch._dynamo.backends.common import aot_autograd

    public, _, tensors = _cases(torch.Generator().manual_seed(4))["ghost_conv"]
    seen = set()

    def record(gm, _inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with ghostkernels.use_backend(backend), torch.no_grad():
        compiled = torch.compile(public, fullgraph=True, backend=aot_autograd(fw_compiler=record))
        out, expected = compiled(*tensors), public(*tensors)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    custom = "ghostkernels.ghost_conv.default" in seen
    assert custom == (backend == "cpu"), seen
    assert ("aten.convolution.default" in seen) == (backend == "reference"), seen


@pytest.mark.parametrize("name", CASE_NAMES)
def test_torch_func_grad_equals_autograd(name):
    """torch.func.grad through a public op (which a torch.library custom op does not support)
    gives autograd's gradient."""
    public, _, tensors = _cases(torch.Generator().manual_seed(5))[name]
    first, rest = tensors[0], tensors[1:]
    grad = torch.func.grad(lambda t: public(t, *rest).square().sum())(first)
    t = first.detach().requires_grad_()
    public(t, *rest).square().sum().backward()
    torch.testing.assert_close(grad, t.grad, rtol=1e-12, atol=1e-12)
