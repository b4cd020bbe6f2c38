"""Fixtures shared by the rtdetr tests."""
import pytest
import torch


@pytest.fixture
def torch_single_thread():
    """One torch thread for the test: tiny models on a shared 2-core machine run much faster
    without intra-op threads (and the suite's workers do not fight over the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
