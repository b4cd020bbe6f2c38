"""ghostkernels.decomposed(): the public ops trace to plain PyTorch ops (for ONNX export), with
the same results as the custom ops."""
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import ghostkernels
from tests.msda_cases import make_inputs, rel_err


def _traced_ops(fn, *args):
    with ghostkernels.decomposed():
        graph = make_fx(fn)(*args)
    return {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}, graph


def test_ms_deform_attn_decomposes_to_grid_sample():
    value, shapes, starts, loc, weights = make_inputs(2, [(5, 4), (2, 3)], 2, 3, 4, 2,
                                                      dtype=torch.float32)

    def fn(v, l, w):
        return ghostkernels.ms_deform_attn(v, shapes, starts, l, w)

    ops, graph = _traced_ops(fn, value, loc, weights)
    assert any("grid_sampler" in op for op in ops), ops
    assert not any("ghostkernels" in op for op in ops), ops
    assert rel_err(graph(value, loc, weights), fn(value, loc, weights)) < 1e-6


def test_depthwise_conv_decomposes_to_convolution():
    x, w, b = torch.randn(2, 6, 9, 7), torch.randn(6, 1, 5, 1), torch.randn(6)

    def fn(x, w, b):
        return ghostkernels.depthwise_conv(x, w, b, stride=2, act="relu")

    ops, graph = _traced_ops(fn, x, w, b)
    assert any("convolution" in op for op in ops), ops
    assert not any("ghostkernels" in op for op in ops), ops
    assert rel_err(graph(x, w, b), fn(x, w, b)) < 1e-6


def test_ghost_conv_with_epilogues_decomposes_to_convolution():
    x, w1, b1 = torch.randn(2, 5, 8, 6), torch.randn(4, 5, 1, 1), torch.randn(4)
    w2, b2 = torch.randn(4, 1, 3, 3), torch.randn(4)
    scale, gate, res = torch.rand(2, 5), torch.rand(2, 7, 4, 3), torch.randn(2, 7, 8, 6)

    def fn(x, scale, gate, res):
        return ghostkernels.ghost_conv(x, w1, b1, w2, b2, "relu", "none", out_channels=7,
                                       input_scale=scale, gate=gate, residual=res)

    ops, graph = _traced_ops(fn, x, scale, gate, res)
    assert any("convolution" in op for op in ops), ops
    assert not any("ghostkernels" in op for op in ops), ops
    assert rel_err(graph(x, scale, gate, res), fn(x, scale, gate, res)) < 1e-6
