"""ghost_conv on the compiled extension (C++ CPU and CUDA C++ kernels).

Kernel contract: see ``ghostkernels/ops/ghost_conv.py`` (x [B,Cin,H,W] dense in NCHW or
channels_last; w_primary [C1,Cin], b_primary [C1], w_cheap [C1,9] (3x3 row-major), b_cheap [C1],
all contiguous; optional input_scale [B,Cin], gate [B,out_channels,Hg,Wg] and residual
[B,out_channels,H,W], the last two dense in x's memory format; all of x's dtype and device)
-> y [B,out_channels,H,W] in x's memory format.
"""
import torch

from ghostkernels.backends import compiled_extension


def _ops():
    compiled_extension()  # loading the library registers torch.ops.ghostkernels_C
    return torch.ops.ghostkernels_C


def forward(x, w_primary, b_primary, w_cheap, b_cheap, relu_primary: bool, relu_cheap: bool,
            out_channels: int, input_scale=None, gate=None, residual=None):
    if x.is_contiguous():
        # The kernels write y (and read gate and residual) in NCHW whenever x is NCHW-contiguous,
        # also when x is channels_last as well (size-1 dims: Cin == 1, H == W == 1), where the op
        # layer may have made gate and residual channels_last.
        gate, residual = (None if t is None else t.contiguous() for t in (gate, residual))
    return _ops().ghost_conv_forward(x, w_primary, b_primary, w_cheap, b_cheap,
                                     bool(relu_primary), bool(relu_cheap), int(out_channels),
                                     input_scale, gate, residual)
