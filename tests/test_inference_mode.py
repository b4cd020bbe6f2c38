"""Every op on every backend runs under ``torch.inference_mode()`` (how serving code runs models)
with inputs made there, and gives what it gives under ``torch.no_grad()``. ms_deform_attn used to
fail there: its level-table cache read the version counter, which inference tensors lack."""
import pytest
import torch

import ghostkernels
from tests.backend_params import ALL_BACKENDS, require


def _msda(g, device, softmax):
    shapes = torch.tensor([[5, 4], [3, 2], [1, 1]], device=device)
    starts = torch.tensor([0, 20, 26], device=device)
    n, lq, m, d, p = 2, 3, 2, 4, 2
    value = torch.randn(n, 27, m, d, generator=g).to(device)
    locations = (torch.rand(n, lq, m, 3, p, 2, generator=g) * 1.2 - 0.1).to(device)
    weights = torch.rand(n, lq, m, 3, p, generator=g).to(device)
    op = ghostkernels.ms_deform_attn_softmax if softmax else ghostkernels.ms_deform_attn
    return op, (value, shapes, starts, locations, weights), {}


def _ghost(g, device):
    c, c1 = 5, 4
    return ghostkernels.ghost_conv, (
        torch.randn(2, c, 6, 7, generator=g).to(device),
        torch.randn(c1, c, 1, 1, generator=g).to(device), torch.randn(c1, generator=g).to(device),
        torch.randn(c1, 1, 3, 3, generator=g).to(device), torch.randn(c1, generator=g).to(device),
        "relu", "none"), {}


def _ghost_depthwise(g, device):
    op, args, _ = _ghost(g, device)
    w_dw = torch.randn(8, 1, 3, 3, generator=g).to(device)
    return ghostkernels.ghost_conv_depthwise, (*args[:5], w_dw, None, *args[5:]), {"stride": 2}


def _depthwise(g, device):
    return ghostkernels.depthwise_conv, (
        torch.randn(2, 3, 7, 6, generator=g).to(device), torch.randn(3, 1, 5, 5, generator=g)
        .to(device), torch.randn(3, generator=g).to(device), 2, "relu"), {}


def _dfc(g, device):
    c, cin = 4, 3
    return ghostkernels.dfc_gate, (
        torch.randn(2, cin, 6, 8, generator=g).to(device),
        torch.randn(c, cin, 1, 1, generator=g).to(device), torch.randn(c, generator=g).to(device),
        torch.randn(c, 1, 1, 5, generator=g).to(device), torch.randn(c, generator=g).to(device),
        torch.randn(c, 1, 5, 1, generator=g).to(device), torch.randn(c, generator=g).to(device)), {}


def _se(g, device):
    c, r = 6, 2
    return ghostkernels.se_excitation, (
        torch.randn(3, c, generator=g).to(device), torch.randn(r, c, 1, 1, generator=g).to(device),
        torch.randn(r, generator=g).to(device), torch.randn(c, r, 1, 1, generator=g).to(device),
        torch.randn(c, generator=g).to(device)), {}


CASES = {
    "ms_deform_attn": lambda g, d: _msda(g, d, False),
    "ms_deform_attn_softmax": lambda g, d: _msda(g, d, True),
    "ghost_conv": _ghost,
    "ghost_conv_depthwise": _ghost_depthwise,
    "depthwise_conv": _depthwise,
    "dfc_gate": _dfc,
    "se_excitation": _se,
}
# the op whose backend registry entry each public function dispatches through
REGISTRY_OP = {"ms_deform_attn_softmax": "ms_deform_attn"}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_op_runs_under_inference_mode(name, backend):
    device = require(backend, REGISTRY_OP.get(name, name), torch.float32)
    seed = int(torch.randint(0, 2**31 - 1, ()))
    with torch.no_grad(), ghostkernels.use_backend(backend):
        op, args, kwargs = CASES[name](torch.Generator().manual_seed(seed), device)
        expected = op(*args, **kwargs)
    with torch.inference_mode(), ghostkernels.use_backend(backend):
        op, args, kwargs = CASES[name](torch.Generator().manual_seed(seed), device)
        assert all(a.is_inference() for a in args if isinstance(a, torch.Tensor))
        got = op(*args, **kwargs)
        again = op(*args, **kwargs)  # a second call (caches filled by the first)
    assert got.is_inference()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
