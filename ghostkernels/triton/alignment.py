"""Alignment facts the launchers pass to the kernels as constexprs.

Triton's JIT specialises an integer argument only as "a multiple of 16" (or not), so a
channels_last tensor with 40, 72 or 120 channels has pixel strides and channel masks that the
compiler must assume unaligned, and every load along the channels becomes a scalar 2-byte load
(sm_90 PTX, tests/test_triton_aot_compile.py). The launcher knows better: it computes the largest
power of two A (at most 16) dividing the relevant integers, and the kernel rewrites each of them
as ``aligned(n, A)``, i.e. ``(n // A) * A`` (equal to n), from which the compiler's alignment
analysis derives divisibility by A for every offset built from them. Masks like ``chans < C`` then
stay constant over A-channel runs and loads and stores along the channels become vectors (8 or 16
bytes).
"""
import math

import triton
import triton.language as tl

MAX_ALIGN = 16


def pixel_alignment(t) -> int:
    """Largest power of two <= 16 dividing the batch, row and column strides of a 4-d tensor
    (every pixel's element offset)."""
    return math.gcd(MAX_ALIGN, t.stride(0), t.stride(2), t.stride(3))


def common_alignment(*counts: int) -> int:
    """Largest power of two <= 16 dividing every one of ``counts``."""
    return math.gcd(MAX_ALIGN, *counts)


@triton.jit
def aligned(n, A: tl.constexpr):
    """``n`` itself, written so that the compiler knows it is a multiple of ``A`` (which the
    launcher guarantees)."""
    return (n // A) * A
