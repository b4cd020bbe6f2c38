"""Which device each backend is tested on, and the skip/fail policy for unavailable backends.

A backend that is not available here is skipped with the reason the registry gives, except the
``cpu`` backend when ``GHOSTKERNELS_REQUIRE_EXTENSION=1`` (set by CI, which builds the extension):
then its absence is a failure, so a broken build cannot pass as skipped tests.
"""
import os

import pytest
import torch

from ghostkernels import backends

TOLERANCE = {  # (forward rel, gradient rel) against the float64 reference; benchmark-protocol.md
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-2),
    torch.bfloat16: (1.5e-2, 5e-2),
}


# Every floating dtype the ops take, and their test ids
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f64", "f32", "f16", "bf16"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 on the CPU: the error measure of every tolerance here."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_compiled_matches_eager(f, tensors, tol: float = 1e-6) -> None:
    """``torch.compile(f, fullgraph=True)`` (aot_eager) gives eager ``f``'s scalar output and its
    gradients with respect to every tensor of ``tensors``, within ``tol`` relative error."""
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inputs = [t.detach().requires_grad_() for t in tensors]
    out = compiled(*inputs)
    grads = torch.autograd.grad(out, inputs)
    eager_inputs = [t.detach().requires_grad_() for t in tensors]
    expected = f(*eager_inputs)
    expected_grads = torch.autograd.grad(expected, eager_inputs)
    assert rel_err(out, expected) < tol
    for g, e in zip(grads, expected_grads):
        assert rel_err(g, e) < tol


def device_for(backend: str) -> str:
    if backend == "cuda":
        return "cuda"
    if backend == "triton":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def require(backend: str, op: str, dtype: torch.dtype) -> str:
    """Skip (or fail, see module docstring) unless ``backend`` runs ``op`` in ``dtype`` here;
    returns the device to test on."""
    device = device_for(backend)
    if backend not in backends.implementations(op):
        pytest.skip(f"{backend} has no implementation of {op}")
    av = backends.availability(backend, device)
    if not av.available:
        if backend == "cpu" and os.environ.get("GHOSTKERNELS_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"the cpu backend must be available in this run: {av.reason}")
        pytest.skip(f"{backend} backend unavailable: {av.reason}")
    if dtype not in backends.implementations(op)[backend].dtypes:
        pytest.skip(f"{backend} does not implement {op} for {dtype}")
    return device


def backend_params(*names):
    marks = {"cuda": [pytest.mark.gpu]}
    return [pytest.param(b, marks=marks.get(b, []), id=b) for b in names]


ALL_BACKENDS = backend_params("reference", "cpu", "triton", "cuda")


def implemented_backends(op: str) -> list:
    """``backend_params`` of the backends that implement ``op`` (not every op has all four)."""
    return backend_params(*(b for b in backends.BACKENDS if b in backends.implementations(op)))
