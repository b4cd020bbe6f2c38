"""dfc_gate on the compiled extension (CUDA C++ kernels; there is no C++ CPU kernel).

Kernel contract: see ``ghostkernels/ops/dfc_gate.py`` (x [B,Cin,H,W], H, W >= 2, dense in NCHW or
channels_last; w_proj [C,Cin], w_h [C,5], w_v [C,5] contiguous; biases [C]) -> gate
[B,C,H//2,W//2] in x's memory format.
"""
import torch

from ghostkernels.backends import compiled_extension


def _ops():
    compiled_extension()  # loading the library registers torch.ops.ghostkernels_C
    return torch.ops.ghostkernels_C


def forward(x, w_proj, b_proj, w_h, b_h, w_v, b_v):
    return _ops().dfc_gate_forward(x, w_proj, b_proj, w_h, b_h, w_v, b_v)
