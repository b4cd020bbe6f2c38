"""ghostkernels: fused GPU kernels for deformable attention and re-parameterised Ghost ops.

Every op is a ``torch.library`` custom op (autograd, fake kernels for torch.compile/export) with
four backends: ``reference`` (PyTorch), ``cpu`` (C++), ``triton`` and ``cuda`` (CUDA C++).
``ghostkernels.backend_report()`` (or ``python -m ghostkernels``) says which are available here.
"""
from ghostkernels.backends import (BACKENDS, BackendUnavailableError, backend_for,
                                   decomposed, format_report, prefer_backend, use_backend)
from ghostkernels.ops import *  # noqa: F401,F403 - the public ops
from ghostkernels.ops import __all__ as _ops_all
from ghostkernels.tuning import tune

__version__ = "0.1.0"


def backend_report() -> str:
    """A human-readable table of the backends available here, and why any is not."""
    return format_report()


__all__ = ["BACKENDS", "BackendUnavailableError", "backend_for", "backend_report", "decomposed",
           "prefer_backend", "tune", "use_backend", *_ops_all]
