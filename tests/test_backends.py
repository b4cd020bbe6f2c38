"""Backend selection: context manager, environment variable, automatic order, the report."""
import subprocess
import sys

import pytest
import torch

import ghostkernels
from ghostkernels import backends


def test_context_manager_nests_and_restores(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.requested_backend() is None
    with ghostkernels.use_backend("reference"):
        assert backends.select("ms_deform_attn", torch.device("cpu"), torch.float32) == "reference"
        with ghostkernels.use_backend("auto"):
            assert backends.requested_backend() is None
        assert backends.requested_backend() == "reference"
    assert backends.requested_backend() is None


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.select("ms_deform_attn", torch.device("cpu"), torch.float32) == "reference"
    with ghostkernels.use_backend("auto"):  # the context manager wins over the environment
        assert backends.requested_backend() is None
    monkeypatch.setenv(backends.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="GHOSTKERNELS_BACKEND must be one of"):
        backends.requested_backend()


def test_automatic_choice_follows_the_measured_order(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    cpu = torch.device("cpu")
    compiled = backends.availability("cpu", "cpu").available
    assert backends.select("ms_deform_attn", cpu, torch.float32) == \
        ("cpu" if compiled else "reference")
    try:
        backends.set_auto_order("ms_deform_attn", "cpu", ("reference", "cpu"))
        assert backends.select("ms_deform_attn", cpu, torch.float32) == "reference"
    finally:
        backends._OP_AUTO_ORDER.pop(("ms_deform_attn", "cpu"))
    with pytest.raises(ValueError, match="order must be"):
        backends.set_auto_order("ghost_conv", "cpu", ("fast",))


def test_a_preferred_backend_runs_where_it_can_and_nowhere_else(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    cpu = torch.device("cpu")
    auto_se = backends.select("se_excitation", cpu, torch.float32)
    auto_msda = backends.select("ms_deform_attn", cpu, torch.float32)
    with ghostkernels.prefer_backend("reference"):
        assert backends.select("ms_deform_attn", cpu, torch.float32) == "reference"
        assert backends.select("ghost_conv", cpu, torch.float64) == "reference"
    if backends.availability("cpu", "cpu").available:
        with ghostkernels.prefer_backend("cpu"):  # se_excitation has no C++ kernel
            assert backends.select("ghost_conv", cpu, torch.float32) == "cpu"
            assert backends.select("se_excitation", cpu, torch.float32) == auto_se
            with ghostkernels.prefer_backend("reference"):  # the innermost preference wins
                assert backends.select("ghost_conv", cpu, torch.float32) == "reference"
            with ghostkernels.use_backend("reference"):  # forcing wins over preferring
                assert backends.select("ghost_conv", cpu, torch.float32) == "reference"
    with ghostkernels.prefer_backend("cuda"):  # no CUDA kernel runs CPU tensors
        assert backends.select("ms_deform_attn", cpu, torch.float32) == auto_msda
    with pytest.raises(ValueError, match="backend must be one of"):
        with ghostkernels.prefer_backend("fastest"):
            pass


def test_a_dtype_the_backend_lacks_is_refused_when_forced():
    with ghostkernels.use_backend("triton"):
        with pytest.raises(ghostkernels.BackendUnavailableError, match="float64|triton"):
            backends.select("ms_deform_attn", torch.device("cpu"), torch.float64)


def test_report_names_every_backend_and_why():
    out = subprocess.run([sys.executable, "-m", "ghostkernels"], capture_output=True, text=True,
                         check=True).stdout
    for name in backends.BACKENDS:
        assert name in out
    assert "automatic choice" in out and "cpu tensors" in out and "cuda tensors" in out
    if not torch.cuda.is_available():
        assert "no CUDA device" in out
    if backends.availability("cpu", "cpu").available:  # an op without a C++ CPU kernel
        assert "except dfc_gate: reference (cpu has no dfc_gate kernel)" in out


def _backward_on_another_thread(out, inputs):
    """Autograd runs the backward of CUDA tensors on its own thread; do the same on the CPU."""
    import threading
    result = {}

    def work():
        result["grads"] = torch.autograd.grad(out.square().sum(), inputs)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return result["grads"]


def _record_calls(monkeypatch, op, backend, function):
    calls = []
    module = backends.implementations(op)[backend].load()
    original = getattr(module, function)

    def spy(*args, **kwargs):
        calls.append(function)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, function, spy)
    return calls


def test_the_backward_runs_on_the_forward_threads_forced_backend(monkeypatch):
    """use_backend is per thread: the backward must not lose it on autograd's device thread."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    from tests.msda_cases import make_inputs
    value, shapes, starts, loc, weights = make_inputs(1, [(4, 5), (2, 3)], 2, 4, 3, 2)
    inputs = [t.requires_grad_() for t in (value, loc, weights)]
    calls = _record_calls(monkeypatch, "ms_deform_attn", "reference", "backward")
    with ghostkernels.use_backend("reference"):
        out = ghostkernels.ms_deform_attn_softmax(inputs[0], shapes, starts, inputs[1],
                                                  inputs[2])
    _backward_on_another_thread(out, inputs)
    assert calls == ["backward"]

    x = torch.randn(1, 4, 6, 5, requires_grad=True)
    w1, wc = torch.randn(3, 4, 1, 1), torch.randn(3, 1, 3, 3)
    residual = torch.randn(1, 6, 6, 5)
    calls = _record_calls(monkeypatch, "ghost_conv", "reference", "forward")
    with ghostkernels.use_backend("reference"):
        y = ghostkernels.ghost_conv(x, w1, None, wc, None, residual=residual)
    _backward_on_another_thread(y, [x])  # recomputes the core output (residual epilogue)
    assert calls == ["forward", "forward"]


def test_the_backward_runs_on_the_forward_threads_preferred_backend(monkeypatch):
    """prefer_backend is per thread as well: the backward (on autograd's device thread for CUDA
    tensors) must choose as the forward did. Preferring the reference over the automatic C++
    kernels shows which choice a backward made."""
    from tests.backend_params import require
    from tests.msda_cases import make_inputs
    require("cpu", "ghost_conv", torch.float64)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    chosen = []
    resolve = backends.resolve

    def spy(op, device, dtype, args=None, kwargs=None):
        module = resolve(op, device, dtype, args, kwargs)
        chosen.append(module.__name__.split(".")[1])  # reference, compiled or triton
        return module

    monkeypatch.setattr(backends, "resolve", spy)
    value, shapes, starts, loc, weights = make_inputs(1, [(4, 5), (2, 3)], 2, 4, 3, 2)
    msda = [t.requires_grad_() for t in (value, loc, weights)]
    x = torch.randn(1, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    w1, wc = torch.randn(3, 4, 1, 1, dtype=torch.float64), torch.randn(3, 1, 3, 3, dtype=x.dtype)
    residual, wd = torch.randn(1, 6, 6, 5, dtype=x.dtype), torch.randn(4, 1, 3, 3, dtype=x.dtype)
    calls = {
        "ms_deform_attn": (lambda: ghostkernels.ms_deform_attn_softmax(
            msda[0], shapes, starts, msda[1], msda[2]), msda),
        "depthwise_conv": (lambda: ghostkernels.depthwise_conv(x, wd), [x]),
        # the backward recomputes the core output (residual epilogue)
        "ghost_conv": (lambda: ghostkernels.ghost_conv(x, w1, None, wc, None,
                                                       residual=residual), [x]),
    }
    for name, (call, inputs) in calls.items():
        assert backends.select(name, torch.device("cpu"), torch.float64) == "cpu", name
        chosen.clear()
        with ghostkernels.prefer_backend("reference"):
            out = call()
        assert chosen == ["reference"], name
        _backward_on_another_thread(out, inputs)
        assert chosen == ["reference", "reference"], name


def test_runnable_backends_lists_exactly_the_backends_that_can_run_an_op():
    from ghostkernels.backends import _supports, runnable_backends
    for op in ("ghost_conv", "ghost_conv_depthwise", "dfc_gate"):
        for dtype in (torch.float64, torch.float32):
            names = runnable_backends(op, "cpu", dtype)
            assert names == [b for b in backends.BACKENDS if _supports(op, b, "cpu", dtype) == ""]
            assert "reference" in names and "cuda" not in names
    # float64: no Triton kernel (interpreter or not), no C++ kernel of this op
    assert runnable_backends("ghost_conv_depthwise", "cpu", torch.float64) == ["reference"]
    with pytest.raises(ValueError, match="op must be one of .*ghost_conv.*got 'gost_conv'"):
        runnable_backends("gost_conv", "cpu", torch.float32)


def test_backend_for_rejects_an_unknown_op():
    """backend_for named "reference" for a misspelt op, as if it would run there."""
    with pytest.raises(ValueError, match=r"op must be one of .*'ghost_conv'.* got 'gost_conv'"):
        ghostkernels.backend_for("gost_conv", "cpu", torch.float32)
    assert ghostkernels.backend_for("ghost_conv", "cpu", torch.float32) in ("cpu", "reference")


def _op_calls():
    """op name -> a call of its public function on float64 inputs with batch ``B``."""
    from tests.msda_cases import make_inputs

    def r(*shape):
        return torch.randn(*shape, dtype=torch.float64)

    def msda(B, softmax=False):
        value, shapes, starts, loc, weights = make_inputs(1, [(4, 5), (2, 3)], 2, 4, 3, 2)
        fn = ghostkernels.ms_deform_attn_softmax if softmax else ghostkernels.ms_deform_attn
        return fn(value[:B], shapes, starts, loc[:B], weights[:B])

    w1, wc = r(3, 4, 1, 1), r(3, 1, 3, 3)
    return {
        "ms_deform_attn": msda,
        "ms_deform_attn_softmax": lambda B: msda(B, softmax=True),
        "ghost_conv": lambda B: ghostkernels.ghost_conv(r(B, 4, 6, 5), w1, None, wc, None),
        "ghost_conv_depthwise": lambda B: ghostkernels.ghost_conv_depthwise(
            r(B, 4, 6, 5), w1, None, wc, None, r(6, 1, 3, 3), None),
        "depthwise_conv": lambda B: ghostkernels.depthwise_conv(r(B, 4, 6, 5), r(4, 1, 3, 3)),
        "dfc_gate": lambda B: ghostkernels.dfc_gate(r(B, 4, 6, 6), r(5, 4, 1, 1), None,
                                                    r(5, 1, 1, 5), None, r(5, 1, 5, 1), None),
        "se_excitation": lambda B: ghostkernels.se_excitation(r(B, 5), r(3, 5), None, r(5, 3),
                                                              None),
    }


@pytest.mark.parametrize("name", list(_op_calls()))
def test_a_forced_backend_that_cannot_run_an_op_raises_for_an_empty_input_too(name):
    """Whether forcing a backend that cannot run an op is an error must not depend on the input's
    size: the ops return early for an empty input, which skipped the check. Triton has no float64
    kernel of any op; the C++ backend has none of some ops."""
    call = _op_calls()[name]
    op = name.replace("_softmax", "")
    forced = ["triton"] + [b for b in ("cpu",) if b not in backends.implementations(op)]
    for backend in forced:
        for batch in (1, 0):
            with ghostkernels.use_backend(backend):
                with pytest.raises(ghostkernels.BackendUnavailableError,
                                   match=f"{backend!r} was requested for ghostkernels.{op}"):
                    call(batch)
        assert call(0).shape[0] == 0  # automatic: an empty result


@pytest.mark.parametrize("name", ["ms_deform_attn", "depthwise_conv"])
def test_a_backward_forced_to_a_backend_that_cannot_run_it_raises_for_an_empty_input_too(name):
    """The same for the ops whose backward runs on a backend: the forward automatic, the
    backward forced where it runs."""
    from tests.msda_cases import make_inputs
    for batch in (1, 0):
        if name == "ms_deform_attn":
            value, shapes, starts, loc, weights = make_inputs(1, [(4, 5), (2, 3)], 2, 4, 3, 2)
            leaves = [t[:batch].clone().requires_grad_() for t in (value, loc, weights)]
            out = ghostkernels.ms_deform_attn(leaves[0], shapes, starts, *leaves[1:])
        else:
            leaves = [torch.randn(shape, dtype=torch.float64, requires_grad=True)
                      for shape in ((batch, 4, 6, 5), (4, 1, 3, 3))]
            out = ghostkernels.depthwise_conv(*leaves)
        with ghostkernels.use_backend("triton"):
            with pytest.raises(ghostkernels.BackendUnavailableError,
                               match=f"'triton' was requested for ghostkernels.{name}"):
                torch.autograd.grad(out.sum(), leaves)
