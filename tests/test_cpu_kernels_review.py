"""Regression tests from a review of the C++ CPU kernels and their adapters
(ghostkernels/compiled): the cpu backend against the reference on inputs the op tests did not
cover (non-dense inputs in the backward, "ambiguous" memory formats, non-finite inputs)."""
import pytest
import torch

from ghostkernels import depthwise_conv, ghost_conv, use_backend
from tests.backend_params import rel_err, require

F64 = torch.float64


def _depthwise_run(backend, x, w, b, stride, act, grad_y):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))  # keeps x's strides
    with use_backend(backend):
        y = depthwise_conv(x, w, b, stride, act)
        y.backward(grad_y)
    return y.detach(), x.grad, w.grad, b.grad


def _non_dense_inputs(B, C, H, W):
    return {
        "sliced": torch.randn(B, C + 2, H + 3, W + 2, dtype=F64)[:, 1:C + 1, 2:H + 2, 1:W + 1],
        "transposed": torch.randn(B, C, W, H, dtype=F64).transpose(2, 3),
        "batch_expanded": torch.randn(1, C, H, W, dtype=F64).expand(B, C, H, W),
        "channel_expanded": torch.randn(B, 1, H, W, dtype=F64).expand(B, C, H, W),
        "channels_last_sliced": torch.randn(B, C + 1, H, W, dtype=F64).contiguous(
            memory_format=torch.channels_last)[:, 1:],
    }


@pytest.mark.parametrize("layout", sorted(_non_dense_inputs(1, 1, 1, 1)))
@pytest.mark.parametrize("stride,act", [(1, "relu"), (2, "none")])
def test_depthwise_conv_backward_of_a_non_dense_input(layout, stride, act):
    """The op saves x as the caller passed it; the cpu backend's backward kernel takes x dense
    (NCHW or channels_last) and raised "x must be contiguous in NCHW or in channels_last" for a
    sliced, transposed or expanded x: the adapter now makes it dense first."""
    require("cpu", "depthwise_conv", F64)
    torch.manual_seed(20261129)
    B, C, H, W = 2, 3, 5, 6
    x = _non_dense_inputs(B, C, H, W)[layout]
    w, b = torch.randn(C, 1, 3, 5, dtype=F64), torch.randn(C, dtype=F64)
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    grad_y = torch.randn(B, C, Ho, Wo, dtype=F64)
    expected = _depthwise_run("reference", x, w, b, stride, act, grad_y)
    got = _depthwise_run("cpu", x, w, b, stride, act, grad_y)
    for name, g, e in zip(("y", "grad_x", "grad_weight", "grad_bias"), got, expected):
        assert rel_err(g, e) < 1e-12, name


@pytest.mark.parametrize("extras", ["gate", "residual", "both"])
def test_ghost_conv_channels_last_input_that_is_also_nchw_with_gate_and_residual(extras):
    """A single-channel slice of a channels_last tensor is made channels_last by the op layer,
    which is then NCHW-contiguous too (Cin == 1): the kernels write y in NCHW there, and the
    op layer's channels_last gate/residual failed the kernel's layout check ("gate must be
    contiguous in the output's memory format Contiguous")."""
    require("cpu", "ghost_conv", F64)
    torch.manual_seed(1129)
    B, H, W, C1, out_channels = 2, 4, 5, 3, 5
    x = torch.randn(B, 2, H, W, dtype=F64).contiguous(memory_format=torch.channels_last)[:, 1:]
    wp, bp = torch.randn(C1, 1, 1, 1, dtype=F64), torch.randn(C1, dtype=F64)
    wc, bc = torch.randn(C1, 1, 3, 3, dtype=F64), torch.randn(C1, dtype=F64)
    kwargs = {}
    if extras in ("gate", "both"):
        kwargs["gate"] = torch.rand(B, out_channels, 2, 3, dtype=F64)
    if extras in ("residual", "both"):
        kwargs["residual"] = torch.randn(B, out_channels, H, W, dtype=F64)
    with use_backend("reference"):
        expected = ghost_conv(x, wp, bp, wc, bc, "relu", "relu", out_channels, **kwargs)
    with use_backend("cpu"):
        got = ghost_conv(x, wp, bp, wc, bc, "relu", "relu", out_channels, **kwargs)
    assert got.stride() == expected.stride()
    assert rel_err(got, expected) < 1e-12


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
@pytest.mark.parametrize("kernel,stride", [((3, 3), 1), ((5, 5), 2), ((1, 5), 1)])
def test_depthwise_conv_grad_weight_with_a_non_finite_input(memory_format, kernel, stride):
    """An inf/NaN input pixel must not reach a weight tap that never reads it at an output: the
    kernel's long dot products also cover scratch positions (zero gradient x whatever pixel the
    tap reaches there), and 0 * inf made grad_weight NaN at taps where the reference's is
    finite."""
    require("cpu", "depthwise_conv", F64)
    torch.manual_seed(7)
    kh, kw = kernel
    x = torch.randn(2, 3, 6, 7, dtype=F64)
    x[0, 1, 2, 0] = float("nan")
    x[1, 2, 0, 6] = float("inf")
    x = x.contiguous(memory_format=memory_format)
    w, b = torch.randn(3, 1, kh, kw, dtype=F64), torch.randn(3, dtype=F64)
    grad_y = torch.rand(2, 3, (6 - 1) // stride + 1, (7 - 1) // stride + 1, dtype=F64) + 0.5
    _, _, expected, _ = _depthwise_run("reference", x, w, b, stride, "none", grad_y)
    _, _, got, _ = _depthwise_run("cpu", x, w, b, stride, "none", grad_y)
    finite = torch.isfinite(expected)
    assert finite.any()  # the case must have taps that never meet the bad pixels
    assert torch.equal(torch.isfinite(got), finite)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.allclose(got[finite], expected[finite], rtol=1e-12, atol=1e-12)
