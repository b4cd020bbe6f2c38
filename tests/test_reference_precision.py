"""The reference backend of the conv ops computes half-precision CUDA tensors in their own dtype
(cuDNN's fp16/bf16 convolutions, the composition measured as the automatic choice on CUDA) and
everything else in ``compute_dtype`` (``reference.ghost_conv.forward_dtype``)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import ghostkernels
from ghostkernels import use_backend
from ghostkernels.reference import ghost_conv as reference
from tests.backend_params import TOLERANCE, rel_err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_forward_dtype(dtype):
    expected_cpu = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    assert reference.forward_dtype(torch.empty(1, dtype=dtype)) == expected_cpu
    assert reference.forward_dtype(SimpleNamespace(is_cuda=True, dtype=dtype)) == (
        dtype if dtype in (torch.float16, torch.bfloat16) else expected_cpu)


def test_native_half_precision_is_the_eager_composition(monkeypatch):
    """With the CUDA rule in force (on CPU tensors, by patching forward_dtype), the reference
    backend's fp16 results are exactly the plain fp16 compositions, and within the fp16 tolerance
    of float64."""
    monkeypatch.setattr(reference, "forward_dtype", lambda x: x.dtype)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64))

    x64 = rand(2, 5, 9, 8).contiguous(memory_format=torch.channels_last)
    w1, b1 = rand(6, 5, 1, 1, scale=0.4), rand(6, scale=0.2)
    wc, bc = rand(6, 1, 3, 3, scale=0.3), rand(6, scale=0.2)
    wd, bd = rand(12, 1, 3, 3, scale=0.3), rand(12, scale=0.2)
    h = [t.half() for t in (x64, w1, b1, wc, bc, wd, bd)]
    x, w1h, b1h, wch, bch, wdh, bdh = h
    x1 = F.relu(F.conv2d(x, w1h, b1h))
    plain_ghost = torch.cat([x1, F.relu(F.conv2d(x1, wch, bch, padding=1, groups=6))], 1)
    plain_depthwise = F.conv2d(plain_ghost, wdh, bdh, stride=2, padding=1, groups=12)
    with use_backend("reference"):
        ghost = ghostkernels.ghost_conv(x, w1h, b1h, wch, bch)
        depthwise = ghostkernels.depthwise_conv(ghost, wdh, bdh, stride=2)
        fused = ghostkernels.ghost_conv_depthwise(x, w1h, b1h, wch, bch, wdh, bdh)
    assert torch.equal(ghost, plain_ghost)
    assert torch.equal(depthwise, plain_depthwise) and torch.equal(fused, plain_depthwise)
    with use_backend("reference"):
        exact = ghostkernels.ghost_conv_depthwise(x64, w1, b1, wc, bc, wd, bd)
    assert rel_err(fused, exact) < TOLERANCE[torch.float16][0]
