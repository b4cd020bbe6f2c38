"""Thin Python adapters over the compiled extension's ops (torch.ops.ghostkernels_C.*).

The same adapter serves the ``cpu`` and ``cuda`` backends: the PyTorch dispatcher routes each call
to the C++ CPU or CUDA kernel by the tensors' device.
"""
