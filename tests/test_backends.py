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
