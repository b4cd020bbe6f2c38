"""Reference DFC attention gate (GhostNetV3 / GhostNetV2, spec ghostnetv3.md §5), at the pooled
resolution: ``sigmoid(dw5x1(dw1x5(conv1x1(avg_pool2d(x, 2, 2)))))`` with a bias after each conv
(kernel contract in ``ghostkernels.ops.dfc_gate``).

Each conv zero-pads its own input: the 1x5 pads the 1x1 result by two columns, the 5x1 pads the
1x5 result by two rows (rows outside the map are zero, not the 1x5 bias). Half-precision inputs are
computed in float32 and rounded once at the end, as the fused kernels do.

``backward`` recomputes the intermediates with the same torch ops and walks back through them with
``aten.convolution_backward`` / ``aten.avg_pool2d_backward`` (plain ops, so torch.compile traces
it).
"""
import torch
import torch.nn.functional as F

from ghostkernels.reference.ghost_conv import compute_dtype, output_memory_format

TAPS = 5  # the 1x5 and 5x1 depthwise kernels
HORIZONTAL_PADDING = (0, TAPS // 2)
VERTICAL_PADDING = (TAPS // 2, 0)


def pooled_size(size: int) -> int:
    """avg_pool2d(kernel 2, stride 2) output size: floor."""
    return size // 2


def _weights(w_proj, w_h, w_v, acc):
    C, Cin = w_proj.shape
    return (w_proj.to(acc).view(C, Cin, 1, 1), w_h.to(acc).view(C, 1, 1, TAPS),
            w_v.to(acc).view(C, 1, TAPS, 1))


def _intermediates(x, w_proj, b_proj, w_h, b_h, w_v, b_v):
    """(pooled, projected, horizontal, pre-sigmoid) in the compute dtype."""
    acc = compute_dtype(x.dtype)
    C = w_proj.shape[0]
    proj, horizontal, vertical = _weights(w_proj, w_h, w_v, acc)
    pooled = F.avg_pool2d(x.to(acc), kernel_size=2, stride=2)
    projected = F.conv2d(pooled, proj, b_proj.to(acc))
    across = F.conv2d(projected, horizontal, b_h.to(acc), padding=HORIZONTAL_PADDING, groups=C)
    logits = F.conv2d(across, vertical, b_v.to(acc), padding=VERTICAL_PADDING, groups=C)
    return pooled, projected, across, logits


def forward(x, w_proj, b_proj, w_h, b_h, w_v, b_v):
    """x [B,Cin,H,W] (H, W >= 2); w_proj [C,Cin]; b_proj [C]; w_h [C,5] (the 1x5 taps, left to
    right); b_h [C]; w_v [C,5] (the 5x1 taps, top to bottom); b_v [C] -> [B,C,H//2,W//2]."""
    logits = _intermediates(x, w_proj, b_proj, w_h, b_h, w_v, b_v)[-1]
    gate = torch.sigmoid(logits)
    return gate.to(x.dtype).contiguous(memory_format=output_memory_format(x))


def _conv_backward(grad_out, inp, weight, padding, groups, mask):
    return torch.ops.aten.convolution_backward(
        grad_out, inp, weight, [weight.shape[0]], [1, 1], list(padding), [1, 1], False, [0, 0],
        groups, mask)


def backward(grad_gate, x, w_proj, b_proj, w_h, b_h, w_v, b_v, needs=(True,) * 7):
    """Gradients (x, w_proj, b_proj, w_h, b_h, w_v, b_v), each in its input's dtype (None where
    ``needs`` is False); float32 inside for half types."""
    C, Cin = w_proj.shape
    acc = compute_dtype(x.dtype)
    proj, horizontal, vertical = _weights(w_proj, w_h, w_v, acc)
    pooled, projected, across, logits = _intermediates(x, w_proj, b_proj, w_h, b_h, w_v, b_v)
    gate = torch.sigmoid(logits)
    g_logits = grad_gate.to(acc) * gate * (1 - gate)
    g_across, g_wv, g_bv = _conv_backward(g_logits, across, vertical, VERTICAL_PADDING, C,
                                          [any(needs[:5]), needs[5], needs[6]])
    g_projected = g_wh = g_bh = None
    if any(needs[:5]):
        g_projected, g_wh, g_bh = _conv_backward(g_across, projected, horizontal,
                                                 HORIZONTAL_PADDING, C,
                                                 [any(needs[:3]), needs[3], needs[4]])
    g_pooled = g_wp = g_bp = None
    if any(needs[:3]):
        g_pooled, g_wp, g_bp = _conv_backward(g_projected, pooled, proj, (0, 0), 1,
                                              [needs[0], needs[1], needs[2]])
    g_x = None
    if needs[0]:
        g_x = torch.ops.aten.avg_pool2d_backward(g_pooled, x.to(acc), [2, 2], [2, 2], [0, 0],
                                                 False, True, None).to(x.dtype)

    def cast(g, like, shape=None):
        if g is None:
            return None
        return (g if shape is None else g.reshape(shape)).to(like.dtype)

    return (g_x, cast(g_wp, w_proj, (C, Cin)), cast(g_bp, b_proj), cast(g_wh, w_h, (C, TAPS)),
            cast(g_bh, b_h), cast(g_wv, w_v, (C, TAPS)), cast(g_bv, b_v))
