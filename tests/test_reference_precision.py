"""How the reference backend of the conv ops runs as the automatic choice on CUDA: half-precision
CUDA tensors are computed in their own dtype (cuDNN's fp16/bf16 convolutions, the composition
measured fastest), everything else in ``compute_dtype`` (``reference.ghost_conv.forward_dtype``);
the gate is upsampled by one ``F.interpolate`` wherever that equals the op's exact index rule."""
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


def test_interpolate_equals_the_exact_nearest_rule_where_used():
    """Every (n_out, n_in) for which upsample_nearest takes F.interpolate: the half size up to
    1024 here (4096 checked once), the same size, and all sizes up to 21."""
    pairs = [(n, n // 2) for n in range(2, 1025)] + [(n, n) for n in (1, 7, 640)]
    pairs += [(n_out, n_in) for n_out in range(1, 22) for n_in in range(1, 24)]
    for n_out, n_in in pairs:
        assert reference.interpolate_agrees(n_out, n_in)
        source = torch.arange(n_in, dtype=torch.float64).view(1, 1, 1, n_in)
        picked = F.interpolate(source, size=(1, n_out), mode="nearest").view(-1).long()
        assert torch.equal(picked, reference.nearest_indices(n_out, n_in, "cpu")), (n_out, n_in)
    assert not reference.interpolate_agrees(46, 14)  # F.interpolate differs there (float32)


@pytest.mark.parametrize("size, gate_size", [((80, 80), (40, 40)), ((9, 31), (4, 15)),
                                             ((46, 5), (14, 5))])
def test_upsample_nearest_follows_the_exact_rule(size, gate_size):
    gate = torch.rand(2, 3, *gate_size, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    up = reference.upsample_nearest(gate, *size)
    rows = reference.nearest_indices(size[0], gate_size[0], "cpu")
    cols = reference.nearest_indices(size[1], gate_size[1], "cpu")
    assert torch.equal(up, gate[:, :, rows][:, :, :, cols])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_reference_ghost_conv_puts_the_primary_relu_in_the_cudnn_call_on_gpu(dtype):
    """On CUDA without autograd the reference's 1x1 conv + ReLU is one cuDNN call (float16 and
    float32; bfloat16 keeps the pair): the ReLU costs no operator, and the values are the plain
    composition's."""
    from ghostkernels.benchmark import count_ops
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 20, 24, generator=g).to("cuda", dtype).contiguous(
        memory_format=torch.channels_last)
    w1, b1 = (0.25 * torch.randn(12, 16, generator=g)).to("cuda", dtype), torch.zeros(
        12, device="cuda", dtype=dtype)
    wc, bc = (0.3 * torch.randn(12, 9, generator=g)).to("cuda", dtype), torch.zeros(
        12, device="cuda", dtype=dtype)
    with torch.no_grad():
        def run(relu):
            return reference.forward(x, w1, b1, wc, bc, relu, False, 24)
        fused_ops, plain_ops = count_ops(lambda: run(True)), count_ops(lambda: run(False))
        assert fused_ops == plain_ops + (1 if dtype == torch.bfloat16 else 0)
        x1 = F.relu(F.conv2d(x, w1.view(12, 16, 1, 1), b1))
        expected = torch.cat([x1, F.conv2d(x1, wc.view(12, 1, 3, 3), bc, padding=1, groups=12)],
                             1)
        assert rel_err(run(True), expected) < 2e-3
