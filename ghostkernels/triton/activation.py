"""Activations shared by the Triton kernels, with torch's NaN semantics.

``tl.maximum`` / ``tl.minimum`` default to ``propagate_nan=NONE`` (``maxnumf``: the non-NaN
operand wins), so ``tl.maximum(nan, 0.0)`` is 0 on a GPU and in the interpreter, where
``torch.relu`` and ``F.hardsigmoid`` (the reference backend, and the CPU and CUDA kernels) keep
NaN. These helpers propagate it (``maximumf`` / ``minimumf``: one ``max.NaN`` / ``min.NaN``
instruction on sm_80+).
"""
import triton
import triton.language as tl


@triton.jit
def relu(x):
    """``max(x, 0)``; NaN stays NaN, as ``torch.relu``."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def hardsigmoid(x):
    """``clamp(x / 6 + 1/2, 0, 1)``; NaN stays NaN, as ``F.hardsigmoid``."""
    y = tl.maximum(x / 6.0 + 0.5, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(y, 1.0, propagate_nan=tl.PropagateNan.ALL)
