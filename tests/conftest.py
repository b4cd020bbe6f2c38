"""Test configuration.

Without a CUDA device the Triton backend runs through the Triton interpreter on CPU tensors
(TRITON_INTERPRET=1 must be set before triton.jit decorates anything, i.e. before ghostkernels'
Triton modules are imported). Tests that need a GPU are marked ``gpu`` and skipped without one.
"""
import os
import random

import pytest
import torch

from tests.cuda_emulation.fixtures import emu  # noqa: F401 - the emulated CUDA kernels fixture

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
# float32 results are compared with float64 references at ~1e-5: no TF32 (cuDNN's default for
# float32 convolutions) anywhere in a test, including the gradients composed of aten ops.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a 2-core CPU")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A fresh, reported seed per test (set GHOSTKERNELS_TEST_SEED to replay one)."""
    seed = int(os.environ.get("GHOSTKERNELS_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    random.seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.fixture
def poisoned_empty():
    """torch.empty (Python and C++) returns NaN-filled memory: unwritten outputs show up as NaN."""
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(8)).all()
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            item.add_report_section("call", "seed", f"GHOSTKERNELS_TEST_SEED={seeds[0]}")
