"""The reference backend's forward of the Ghost op without autograd (its backend call, and the
automatic choice on CUDA): each half's epilogue writes its channels of the output directly (no
``cat``, no upsampled gate), and an SE input scale goes into the 1x1 conv's weights
(``reference.conv.pointwise_conv``). Checked against plain float64 compositions written here,
against the differentiable composition (exactly), and for the bytes it moves on fake CUDA
tensors (the default GPU path's traffic, without a GPU)."""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from ghostkernels.reference import conv
from ghostkernels.reference import ghost_conv as reference


def _rand(g, *shape, scale=1.0, dtype=torch.float64):
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def plain_ghost(x, w1, b1, wc, bc, relu1, relu2, out_channels, scale, gate, residual):
    """The op's definition from whole-tensor ops: scaled input, 1x1 conv, 3x3 depthwise conv,
    cat, slice, the gate upsampled by explicit nearest indices, the residual added."""
    C1, Cin = w1.shape
    xs = x if scale is None else x * scale[:, :, None, None]
    x1 = F.conv2d(xs, w1.view(C1, Cin, 1, 1), b1)
    x1 = F.relu(x1) if relu1 else x1
    x2 = F.conv2d(x1, wc.view(C1, 1, 3, 3), bc, padding=1, groups=C1)
    x2 = F.relu(x2) if relu2 else x2
    y = torch.cat([x1, x2], 1)[:, :out_channels]
    H, W = y.shape[-2:]
    if gate is not None:
        Hg, Wg = gate.shape[-2:]
        rows, cols = torch.arange(H) * Hg // H, torch.arange(W) * Wg // W
        y = y * gate[:, :, rows][:, :, :, cols]
    return y if residual is None else y + residual


CASES = [  # (B, Cin, C1, out_channels, H, W, gate size or None)
    (2, 5, 6, 12, 8, 10, (4, 5)),    # whole-factor gate: broadcast over 2 x 2 blocks
    (1, 3, 4, 7, 9, 7, (4, 3)),      # odd sizes: the gate upsampled by the exact rule
    (2, 4, 5, 5, 6, 6, (2, 3)),      # out_channels == C1: no cheap half; factors 3 and 2
    (3, 7, 3, 6, 1, 5, (1, 5)),      # one row, gate of the same width
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("epilogue", ["none", "gate", "residual", "scale+residual", "all"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relus", [(True, True), (False, False), (True, False)])
def test_no_grad_reference_ghost_conv_is_the_plain_composition(case, epilogue, channels_last,
                                                                relus, _fresh_seed):
    B, Cin, C1, out_channels, H, W, gate_size = case
    g = torch.Generator().manual_seed(_fresh_seed)
    x = _layout(_rand(g, B, Cin, H, W), channels_last)
    w1, b1 = _rand(g, C1, Cin, scale=0.5), _rand(g, C1, scale=0.3)
    wc, bc = _rand(g, C1, 9, scale=0.4), _rand(g, C1, scale=0.3)
    scale = torch.rand(B, Cin, generator=g, dtype=torch.float64) if "scale" in epilogue or \
        epilogue == "all" else None
    gate = _layout(torch.rand(B, out_channels, *gate_size, generator=g, dtype=torch.float64),
                   channels_last) if epilogue in ("gate", "all") else None
    residual = _layout(_rand(g, B, out_channels, H, W), channels_last) \
        if "residual" in epilogue or epilogue == "all" else None
    args = (x, w1, b1, wc, bc, *relus, out_channels, scale, gate, residual)
    with torch.no_grad():
        y = reference.forward(*args)
    expected = plain_ghost(*args)
    assert y.shape == expected.shape and y.dtype == x.dtype
    assert (y - expected).abs().max() <= 1e-12 * expected.abs().max().clamp_min(1)
    assert y.is_contiguous(memory_format=reference.output_memory_format(x))
    # the differentiable composition (cat, then the epilogues) computes the same numbers
    differentiable = reference.forward(x.requires_grad_(), *args[1:])
    assert differentiable.requires_grad and torch.equal(differentiable.detach(), y)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("relu", [False, True])
def test_pointwise_conv_puts_the_input_scale_into_the_weights(dtype, layout, relu, _fresh_seed):
    g = torch.Generator().manual_seed(_fresh_seed)
    x = _rand(g, 3, 6, 7, 5, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # neither layout: scaled first, then a plain conv
        x = _rand(g, 3, 6, 7, 10, dtype=dtype)[..., ::2]
    w, b = _rand(g, 4, 6, scale=0.5, dtype=dtype), _rand(g, 4, scale=0.3, dtype=dtype)
    scale = torch.rand(3, 6, generator=g, dtype=torch.float64).to(dtype)
    y = conv.pointwise_conv(x, w, b, relu, scale)
    expected = F.conv2d(x.double() * scale.double()[:, :, None, None],
                        w.double().view(4, 6, 1, 1), b.double())
    expected = F.relu(expected) if relu else expected
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert y.dtype == dtype and y.shape == (3, 4, 7, 5)
    assert (y.double() - expected).abs().max() <= tol * expected.abs().max()
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def _traffic_on_fake_cuda(fn_of_fake_tensors, *shapes_and_layouts):
    """(op names, bytes moved) of ``fn`` on fake float16 CUDA tensors of the given shapes."""
    from bench.backbone_floors import _shape_only_cudnn_convolution_relu, op_traffic
    _shape_only_cudnn_convolution_relu()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        tensors = [None if shape is None else _layout(
            torch.empty(shape, device="cuda", dtype=torch.float16), channels_last)
            for shape, channels_last in shapes_and_layouts]
        records = op_traffic(lambda: fn_of_fake_tensors(*tensors))
    return [name for name, _ in records], sum(b for _, b in records)


@pytest.mark.skipif(not torch.backends.cudnn.is_available(),
                    reason="this torch build has no cuDNN (the reference's CUDA path uses it)")
def test_reference_ghost_conv_on_cuda_writes_each_output_once():
    """On (fake) CUDA fp16 tensors: the DFC-gated ghost1 of a GhostNetV3 block and the
    SE-scaled ghost2 with its shortcut move at most x plus 4.5 times the output's bytes (the
    1x1 conv reads x once and writes x1; the depthwise conv reads x1 and writes x2; the cheap
    ReLU rewrites x2; each half's epilogue reads it and writes the output): no cat, no
    upsampled gate, no scaled copy of x. The composition before (cat, upsample, multiply; x
    scaled first) moved x + 8.5 and 3 x + 6.5 outputs."""
    B, Cin, C1, H, W = 2, 40, 60, 16, 16
    out_bytes, x_bytes = B * 2 * C1 * H * W * 2, B * Cin * H * W * 2
    weights = [((C1, Cin), False), ((C1,), False), ((C1, 9), False), ((C1,), False)]

    def gated(x, w1, b1, wc, bc, gate):
        return reference.forward(x, w1, b1, wc, bc, True, True, 2 * C1, gate=gate)

    names, moved = _traffic_on_fake_cuda(
        gated, ((B, Cin, H, W), True), *weights, ((B, 2 * C1, H // 2, W // 2), True))
    assert "cat" not in names and "upsample_nearest2d" not in names, names
    assert "cudnn_convolution_relu" in names  # the primary ReLU in the cuDNN call
    assert moved <= x_bytes + 4.5 * out_bytes + 0.3 * out_bytes, (names, moved)  # + the gate

    def scaled(x, w1, b1, wc, bc, scale, residual):
        return reference.forward(x, w1, b1, wc, bc, False, False, 2 * C1, scale,
                                 residual=residual)

    names, moved = _traffic_on_fake_cuda(
        scaled, ((B, Cin, H, W), True), *weights, ((B, Cin), False),
        ((B, 2 * C1, H, W), True))
    assert "cat" not in names and "baddbmm" in names, names
    per_image_weights = B * C1 * Cin * 2  # written once, read by baddbmm (+ w1 and the scale)
    assert moved <= x_bytes + 4.5 * out_bytes + 3 * per_image_weights, (names, moved)


# the dtype's tolerance relative to the output's largest value: inputs, x1 and the output each
# rounded once to the dtype, accumulations in float32 (TF32 is off in conftest.py)
GPU_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 2e-5}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("epilogue", ["none", "gate", "scale+residual", "all"])
def test_no_grad_reference_ghost_conv_on_the_gpu(dtype, channels_last, epilogue, _fresh_seed):
    """The default GPU path of the Ghost op (the automatic choice on CUDA: the reference without
    autograd, i.e. cuDNN's conv + ReLU, the SE scale in per-image weights through baddbmm, and
    each half's epilogue written into its channels of the output with the gate broadcast) on real
    CUDA tensors, through the public op, against the plain float64 composition of the same
    rounded inputs on the CPU."""
    import ghostkernels
    B, Cin, C1, H, W = 2, 24, 20, 16, 12  # whole-factor gate; the odd case below
    g = torch.Generator().manual_seed(_fresh_seed)
    for out_channels, gate_size in ((2 * C1, (H // 2, W // 2)), (2 * C1 - 3, (5, 5))):
        host = {
            "x": _rand(g, B, Cin, H, W), "w1": _rand(g, C1, Cin, scale=0.3),
            "b1": _rand(g, C1, scale=0.3), "wc": _rand(g, C1, 9, scale=0.4),
            "bc": _rand(g, C1, scale=0.3),
            "scale": (torch.rand(B, Cin, generator=g, dtype=torch.float64)
                      if "scale" in epilogue or epilogue == "all" else None),
            "gate": (torch.rand(B, out_channels, *gate_size, generator=g, dtype=torch.float64)
                     if epilogue in ("gate", "all") else None),
            "residual": (_rand(g, B, out_channels, H, W)
                         if "residual" in epilogue or epilogue == "all" else None)}
        host = {k: None if v is None else v.to(dtype).double() for k, v in host.items()}
        dev = {k: None if v is None
               else _layout(v.to("cuda", dtype), channels_last and v.dim() == 4)
               for k, v in host.items()}
        expected = plain_ghost(host["x"], host["w1"], host["b1"], host["wc"], host["bc"], True,
                               True, out_channels, host["scale"], host["gate"], host["residual"])
        with torch.no_grad():
            y = ghostkernels.ghost_conv(
                dev["x"], dev["w1"].view(C1, Cin, 1, 1), dev["b1"], dev["wc"].view(C1, 1, 3, 3),
                dev["bc"], act_primary="relu",
                act_cheap="relu", out_channels=out_channels, input_scale=dev["scale"],
                gate=dev["gate"], residual=dev["residual"])
        assert ghostkernels.backend_for("ghost_conv", dev["x"].device, dtype) == "reference"
        assert y.shape == expected.shape and y.dtype == dtype and y.device.type == "cuda"
        error = (y.double().cpu() - expected).abs().max()
        assert error <= GPU_TOL[dtype] * expected.abs().max(), (out_channels, float(error))
