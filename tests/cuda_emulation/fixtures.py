"""The pytest fixture of the emulated CUDA kernels (registered by tests/conftest.py), shared by
the test files that use them."""
import pytest

from tests.cuda_emulation import build
from tests.cuda_emulation.kernels import EmulatedKernels


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    """The kernels built once per session (cached on the sources' hash), on a 2-SM grid; skipped
    only when no C++ compiler exists."""
    try:
        libraries = build.build()
    except build.CompilerMissing as e:
        pytest.skip(f"CUDA emulation needs a C++ compiler: {e}")
    except PermissionError:  # read-only home: build under pytest's temporary directory
        libraries = build.build(tmp_path_factory.mktemp("cuda_emulation"))
    kernels = EmulatedKernels(libraries)
    kernels.set_sm_count(2)
    return kernels
