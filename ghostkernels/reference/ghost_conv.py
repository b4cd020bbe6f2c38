"""Reference folded Ghost op: ``y = cat(x1, x2)[:, :out_channels]`` with
``x1 = act(conv1x1(x * s) + b1)`` and ``x2 = act(dwconv3x3(x1, padding 1) + b2)``, then the
optional epilogues ``y = y * nearest_upsample(gate) + residual``.

This *defines* the op (kernel contract in ``ghostkernels.ops.ghost_conv``). Half-precision inputs
are computed in float32 and rounded once at the end, as the fused kernels do (x2 is computed from
the unrounded x1); on CUDA tensors they are computed in their own dtype (``forward_dtype``).
``s`` is the optional per-(image, channel) ``input_scale``; the gate is indexed
``gate[..., (h * Hg) // H, (w * Wg) // W]`` (:func:`upsample_nearest`).

``backward`` gives the core gradients from the core output ``y0 = cat(x1, x2)[:, :out_channels]``
alone: x1 is ``y0[:, :C1]`` (out_channels >= C1 always) and the ReLU masks are ``y0 > 0``.
``epilogue_backward`` peels the gate and residual off, ``scale_backward`` the input scale.
"""
import torch
import torch.nn.functional as F

from ghostkernels.reference.conv import pointwise_conv


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float64, torch.float32) else torch.float32


def forward_dtype(x) -> torch.dtype:
    """The dtype the reference forwards of the conv ops (ghost_conv, depthwise_conv,
    ghost_conv_depthwise) compute in: ``compute_dtype``, except for float16/bfloat16 CUDA
    tensors, which stay in their dtype. There the reference backend is the automatic choice
    because cuDNN's half-precision convolutions (fp32 accumulation inside each conv) were measured
    fastest (BENCHMARKS.md); computing in float32 instead would add a cast pass per tensor and
    double the bytes of every conv. The price: the Ghost output is rounded twice (x1 before the
    depthwise conv, then x2), within the dtype tolerances the kernels are held to. Gradients are
    computed in ``compute_dtype`` everywhere."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        return x.dtype
    return compute_dtype(x.dtype)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is laid out channels-last (and not also plain contiguous), else NCHW."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.channels_last if x.stride(1) < x.stride(3) else torch.contiguous_format


def nearest_indices(n_out: int, n_in: int, device) -> torch.Tensor:
    """Source index ``floor(i * n_in / n_out)`` of each of ``n_out`` outputs, in exact integer
    arithmetic (as every backend computes it). This is the rule of ``F.interpolate(mode="nearest",
    size=...)``, which evaluates it in float32: the two agree for every size up to 21 and, for the
    DFC gate's ``n_in = n_out // 2``, for every ``n_out`` up to 4096 (checked), but float32
    rounding makes PyTorch differ for some other pairs (e.g. 14 -> 46)."""
    return torch.arange(n_out, device=device) * n_in // n_out


# Largest size for which F.interpolate's float32 index rule was checked to equal
# ``nearest_indices`` for the gate's half-size source (tests/test_reference_precision.py checks it)
INTERPOLATE_HALF_SIZE_CHECKED = 4096


def interpolate_agrees(n_out: int, n_in: int) -> bool:
    """Whether ``F.interpolate(mode="nearest")`` picks ``nearest_indices(n_out, n_in)`` (see
    there): the same size, the DFC gate's half size up to INTERPOLATE_HALF_SIZE_CHECKED, or any
    size up to 21."""
    return (n_in == n_out or n_out <= 21
            or (n_in == n_out // 2 and n_out <= INTERPOLATE_HALF_SIZE_CHECKED))


def upsample_nearest(gate: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """gate [B, C, Hg, Wg] -> [B, C, H, W] by nearest neighbour (``nearest_indices``): one
    ``F.interpolate`` where it agrees with the rule (every GhostNetV3 gate; one kernel instead of
    the index arithmetic and two gathers, which at batch 1 cost more launches than bytes), else
    the exact gathers."""
    Hg, Wg = gate.shape[-2:]
    if interpolate_agrees(H, Hg) and interpolate_agrees(W, Wg):
        return F.interpolate(gate, size=(H, W), mode="nearest")
    rows = nearest_indices(H, Hg, gate.device)
    cols = nearest_indices(W, Wg, gate.device)
    return gate.index_select(2, rows).index_select(3, cols)


def sum_to_gate(t: torch.Tensor, Hg: int, Wg: int) -> torch.Tensor:
    """The adjoint of ``upsample_nearest``: t [B, C, H, W] summed into [B, C, Hg, Wg]."""
    B, C, H, W = t.shape
    rows = nearest_indices(H, Hg, t.device)
    cols = nearest_indices(W, Wg, t.device)
    by_rows = t.new_zeros(B, C, Hg, W).index_add(2, rows, t)
    return t.new_zeros(B, C, Hg, Wg).index_add(3, cols, by_rows)


def multiply_by_upsampled(y: torch.Tensor, gate: torch.Tensor, out=None) -> torch.Tensor:
    """``y * upsample_nearest(gate, H, W)`` (into ``out`` when given). Where H and W are whole
    multiples of the gate's size (every GhostNetV3 gate), the gate is broadcast over each f x f
    block of a 6-d view instead of upsampled: the same products, without writing and reading
    back an upsampled gate as large as y."""
    B, C, H, W = y.shape
    Hg, Wg = gate.shape[-2:]
    if H % Hg or W % Wg:
        return torch.mul(y, upsample_nearest(gate, H, W), out=out)
    blocks = (B, C, Hg, H // Hg, Wg, W // Wg)  # nearest index of h: h // (H // Hg)
    g = gate[:, :, :, None, :, None]
    if out is None:
        return (y.view(blocks) * g).reshape(B, C, H, W)
    torch.mul(y.view(blocks), g, out=out.view(blocks))
    return out


def _write_epilogue(part: torch.Tensor, out: torch.Tensor, gate, residual) -> None:
    """``out = part * upsample(gate) + residual`` (each optional) written into ``out``, a channel
    slice of the output: the epilogue and the concatenation in one pass."""
    if gate is not None:
        multiply_by_upsampled(part, gate, out=out)
        if residual is not None:
            out.add_(residual)
    elif residual is not None:
        torch.add(part, residual, out=out)
    else:
        out.copy_(part)


def _needs_plain_composition(*tensors) -> bool:
    """Whether the forward must be the composition of out-of-place ops (cat, then the
    epilogues): under autograd recording, and for compilers and tracers (torch.compile of the
    decomposed op, the ONNX exporter), which handle neither ``out=`` writes into views nor
    in-place ops as well as they fuse the plain ones."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def forward(x, w_primary, b_primary, w_cheap, b_cheap, relu_primary: bool, relu_cheap: bool,
            out_channels: int, input_scale=None, gate=None, residual=None):
    """x [B,Cin,H,W]; w_primary [C1,Cin]; b_primary [C1]; w_cheap [C1,9]; b_cheap [C1];
    input_scale [B,Cin] or None; gate [B,out_channels,Hg,Wg] or None; residual
    [B,out_channels,H,W] or None.

    Without autograd recording (the backend call of the op), each half's epilogue writes its
    channels of the output directly (``_write_epilogue``): no ``cat`` pass, no upsampled gate,
    and the input scale inside the 1x1 conv's weights (``conv.pointwise_conv``). With autograd
    (``reference.ghost_conv_depthwise``'s backward differentiates this) or a compiler or tracer
    (``_needs_plain_composition``), the same values from out-of-place ops: cat, then the
    epilogues."""
    C1, Cin = w_primary.shape
    B, _, H, W = x.shape
    acc = forward_dtype(x)
    x1 = pointwise_conv(x.to(acc), w_primary.to(acc), b_primary.to(acc), relu_primary,
                        input_scale)
    C2 = out_channels - C1  # cheap channels that survive the slice
    x2 = None
    if C2 > 0:
        x2 = F.conv2d(x1[:, :C2], w_cheap[:C2].to(acc).view(C2, 1, 3, 3), b_cheap[:C2].to(acc),
                      padding=1, groups=C2)
    gate, residual = (None if t is None else t.to(acc) for t in (gate, residual))
    fmt = output_memory_format(x)
    if _needs_plain_composition(x, w_primary, b_primary, w_cheap, b_cheap, input_scale, gate,
                                residual):
        if x2 is not None:
            x2 = torch.relu(x2) if relu_cheap else x2
        y = torch.cat([x1] if x2 is None else [x1, x2], dim=1)
        if gate is not None:
            y = multiply_by_upsampled(y, gate)
        if residual is not None:
            y = y + residual
        return y.to(x.dtype).contiguous(memory_format=fmt)
    y = torch.empty((B, out_channels, H, W), dtype=acc, device=x.device, memory_format=fmt)
    for lo, part in ((0, x1), (C1, x2)):
        if part is None:
            continue
        hi = lo + part.shape[1]
        out = y[:, lo:hi]
        if lo and relu_cheap:
            if gate is None and residual is None:
                torch.clamp_min(part, 0, out=out)  # the ReLU writes the output: one pass
                continue
            part = part.relu_()  # x2 is this function's own tensor
        _write_epilogue(part, out, None if gate is None else gate[:, lo:hi],
                        None if residual is None else residual[:, lo:hi])
    return y.to(x.dtype)


def _conv_backward(grad_out, inp, weight, padding, stride, groups, mask):
    return torch.ops.aten.convolution_backward(
        grad_out, inp, weight, [weight.shape[0]], [stride, stride], list(padding), [1, 1],
        False, [0, 0], groups, mask)


def backward(grad_y, y, x, w_primary, w_cheap, relu_primary: bool, relu_cheap: bool,
             needs=(True, True, True, True, True)):
    """Gradients (x, w_primary, b_primary, w_cheap, b_cheap) from the forward output ``y``.

    Plain differentiable PyTorch ops, computed in float32 for half types; every gradient comes
    back in its input's dtype (None where ``needs`` is False)."""
    C1, Cin = w_primary.shape
    out_channels = y.shape[1]
    C2 = out_channels - C1
    acc = compute_dtype(x.dtype)
    g = grad_y.to(acc)
    y = y.to(acc)
    x1 = y[:, :C1]
    g_x1 = g[:, :C1]
    g_w_cheap = g_b_cheap = None
    if C2 > 0:
        g2 = g[:, C1:]
        if relu_cheap:
            g2 = g2 * (y[:, C1:] > 0)
        cheap_w = w_cheap[:C2].to(acc).view(C2, 1, 3, 3)
        g_in, g_w, g_b = _conv_backward(g2, x1[:, :C2], cheap_w, (1, 1), 1, C2,
                                        [True, needs[3], needs[4]])
        g_x1 = g_x1 + F.pad(g_in, (0, 0, 0, 0, 0, C1 - C2))
        if needs[3]:
            g_w_cheap = F.pad(g_w.reshape(C2, 9), (0, 0, 0, C1 - C2)).to(w_cheap.dtype)
        if needs[4]:
            g_b_cheap = F.pad(g_b, (0, C1 - C2)).to(w_cheap.dtype)
    else:
        zeros = w_cheap.new_zeros(C1, 9)
        g_w_cheap = zeros if needs[3] else None
        g_b_cheap = zeros[:, 0].contiguous() if needs[4] else None
    if relu_primary:
        g_x1 = g_x1 * (x1 > 0)
    g_x, g_w, g_b = _conv_backward(g_x1, x.to(acc), w_primary.to(acc).view(C1, Cin, 1, 1),
                                   (0, 0), 1, 1, [needs[0], needs[1], needs[2]])
    return (g_x.to(x.dtype) if needs[0] else None,
            g_w.reshape(C1, Cin).to(w_primary.dtype) if needs[1] else None,
            g_b.to(w_primary.dtype) if needs[2] else None,
            g_w_cheap, g_b_cheap)


def epilogue_backward(grad_y, y0, gate, needs_gate: bool, needs_residual: bool):
    """(grad of y0, grad of gate, grad of residual) for ``y = y0 * upsample(gate) + residual``;
    y0 is the core output (before the epilogues). Computed in float32 for half types."""
    g_residual = grad_y if needs_residual else None
    if gate is None:
        return grad_y, None, g_residual
    acc = compute_dtype(grad_y.dtype)
    g = grad_y.to(acc)
    g_gate = None
    if needs_gate:
        g_gate = sum_to_gate(g * y0.to(acc), *gate.shape[-2:]).to(gate.dtype)
    return multiply_by_upsampled(g, gate.to(acc)), g_gate, g_residual


def scale_backward(grad_scaled_x, x, input_scale, needs_x: bool, needs_scale: bool):
    """(grad of x, grad of input_scale) from the gradient of ``x * input_scale[:, :, None, None]``
    (``conv.scale_input``)."""
    if input_scale is None:
        return grad_scaled_x, None
    if grad_scaled_x is None:  # neither x nor input_scale needs a gradient
        return None, None
    acc = compute_dtype(x.dtype)
    g = grad_scaled_x.to(acc)
    g_x = (g * input_scale.to(acc)[:, :, None, None]).to(x.dtype) if needs_x else None
    g_s = (g * x.to(acc)).sum((2, 3)).to(input_scale.dtype) if needs_scale else None
    return g_x, g_s
