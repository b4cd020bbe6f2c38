"""Reference of the Ghost op followed by a strided depthwise conv (kernel contract in
``ghostkernels.ops.ghost_conv_depthwise``):

``g = ghost_conv(x, w_primary, b_primary, w_cheap, b_cheap, ..., input_scale, gate)`` (the folded
Ghost module with its DFC gate), then ``y = act_dw(dwconv_kxk(g, stride, padding k//2) + b_dw)``.

This *defines* the op. Half-precision inputs are computed in float32 throughout and rounded once
at the end, as the fused kernel does (g is never rounded to the input type); on CUDA tensors they
are computed in their own dtype (``reference.ghost_conv.forward_dtype``). ``backward``
recomputes the forward with PyTorch autograd: it is the only formula the op needs.
"""
import torch

from ghostkernels.reference import depthwise_conv as depthwise
from ghostkernels.reference import ghost_conv as ghost
from ghostkernels.reference.ghost_conv import output_memory_format


def forward(x, w_primary, b_primary, w_cheap, b_cheap, w_dw, b_dw, kernel_size: int,
            stride: int, relu_primary: bool, relu_cheap: bool, relu_dw: bool, out_channels: int,
            input_scale=None, gate=None):
    """x [B,Cin,H,W]; w_primary [C1,Cin]; b_primary [C1]; w_cheap [C1,9]; b_cheap [C1];
    w_dw [out_channels, k*k]; b_dw [out_channels]; input_scale [B,Cin] or None; gate
    [B,out_channels,Hg,Wg] or None. Returns [B, out_channels, Ho, Wo] of x's dtype."""
    acc = ghost.forward_dtype(x)
    g = ghost.forward(x.to(acc), w_primary, b_primary, w_cheap, b_cheap, relu_primary,
                      relu_cheap, out_channels, input_scale, gate)
    y = depthwise.forward(g, w_dw.to(acc), b_dw.to(acc), kernel_size, kernel_size, stride,
                          relu_dw)
    return y.to(x.dtype).contiguous(memory_format=output_memory_format(x))


TENSOR_ARGS = ("x", "w_primary", "b_primary", "w_cheap", "b_cheap", "w_dw", "b_dw",
               "input_scale", "gate")


def backward(grad_y, tensors: dict, geometry: dict, needs: dict) -> dict:
    """Gradients of the tensors named in ``needs`` (those mapped to True), by differentiating
    :func:`forward` with autograd. ``tensors`` maps every name of ``TENSOR_ARGS`` to its tensor
    (or None); ``geometry`` holds forward's other arguments by name."""
    # Grad mode on here: the caller's create_graph=True, so differentiate the tensors themselves
    # and keep the graph (a double backward); else detached leaves.
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = {name: (None if t is None else t if create_graph and t.requires_grad
                         else t.detach().requires_grad_(bool(needs.get(name))))
                  for name, t in tensors.items()}
        y = forward(**leaves, **geometry)
        wanted = [name for name in TENSOR_ARGS if needs.get(name) and leaves[name] is not None]
        # allow_unused: w_cheap and b_cheap do not reach y when out_channels == C1 (zeros then)
        grads = torch.autograd.grad(y, [leaves[n] for n in wanted], grad_y.to(y.dtype),
                                    allow_unused=True, materialize_grads=True,
                                    create_graph=create_graph)
    return dict(zip(wanted, grads))
