"""Triton kernels, one module per op (imported lazily by the backend registry).

On a machine without a CUDA device they run through the Triton interpreter on CPU tensors; set
``TRITON_INTERPRET=1`` before importing these modules (``triton.jit`` reads it at decoration time).
"""
