"""Reference SE excitation (GhostNetV3's squeeze-and-excitation MLP after the global average):
``hardsigmoid(w_expand @ relu(w_reduce @ pooled + b_reduce) + b_expand)`` per image (kernel
contract in ``ghostkernels.ops.se_excitation``). ``hardsigmoid(z) = clamp(z / 6 + 1/2, 0, 1)``.

Half-precision inputs are computed in float32 and rounded once at the end, as the fused kernel
does. ``backward`` recomputes the two pre-activations with the same torch ops and walks back
through them with matmuls and ``aten.threshold_backward`` / ``aten.hardsigmoid_backward`` (plain
ops, so torch.compile traces it).
"""
import torch
import torch.nn.functional as F

from ghostkernels.reference.ghost_conv import compute_dtype


def _pre_activations(pooled, w_reduce, b_reduce, w_expand, b_expand):
    """(hidden before the ReLU [B, R], output before the hard-sigmoid [B, C]) in the compute
    dtype."""
    acc = compute_dtype(pooled.dtype)
    hidden = F.linear(pooled.to(acc), w_reduce.to(acc), b_reduce.to(acc))
    logits = F.linear(torch.relu(hidden), w_expand.to(acc), b_expand.to(acc))
    return hidden, logits


def forward(pooled, w_reduce, b_reduce, w_expand, b_expand):
    """pooled [B, C]; w_reduce [R, C]; b_reduce [R]; w_expand [C, R]; b_expand [C] -> [B, C]."""
    logits = _pre_activations(pooled, w_reduce, b_reduce, w_expand, b_expand)[1]
    return F.hardsigmoid(logits).to(pooled.dtype)


def backward(grad_out, pooled, w_reduce, b_reduce, w_expand, b_expand, needs=(True,) * 5):
    """Gradients (pooled, w_reduce, b_reduce, w_expand, b_expand), each in its input's dtype (None
    where ``needs`` is False); float32 inside for half types."""
    acc = compute_dtype(pooled.dtype)
    hidden, logits = _pre_activations(pooled, w_reduce, b_reduce, w_expand, b_expand)
    g_logits = torch.ops.aten.hardsigmoid_backward(grad_out.to(acc), logits)
    g_w_expand = g_logits.t() @ torch.relu(hidden) if needs[3] else None
    g_b_expand = g_logits.sum(0) if needs[4] else None
    g_pooled = g_w_reduce = g_b_reduce = None
    if any(needs[:3]):
        g_hidden = torch.ops.aten.threshold_backward(g_logits @ w_expand.to(acc), hidden, 0)
        if needs[0]:
            g_pooled = g_hidden @ w_reduce.to(acc)
        if needs[1]:
            g_w_reduce = g_hidden.t() @ pooled.to(acc)
        if needs[2]:
            g_b_reduce = g_hidden.sum(0)

    def cast(g, like):
        return None if g is None else g.to(like.dtype)

    return (cast(g_pooled, pooled), cast(g_w_reduce, w_reduce), cast(g_b_reduce, b_reduce),
            cast(g_w_expand, w_expand), cast(g_b_expand, b_expand))
