"""The eager fast path of the public ops.

Every op is a ``torch.library`` custom op (one graph node for torch.compile and export, a fake
kernel, opcheck). In plain eager mode that wrapper costs more host time than the kernels of a
small input: on the development CPU, a tiny MSDA forward+backward took 225-245 us through the
custom op and 165-190 us through this path, a forward with grad 55-72 and 31-40 us (the kernel
itself: ~4 us). On a GPU at batch 1 this host time, not the GPU, sets the latency.

So the public functions call :class:`EagerOp`: when nothing needs the custom op (no compile or
export tracing, no dispatch or torch-function mode such as FakeTensorMode or an op counter, only
plain tensors and parameters), it runs the op's own implementation, setup_context and backward
through a plain ``torch.autograd.Function``; otherwise the custom op. Both run the same functions,
so values, gradients and backend choice are identical (tests/test_eager_path.py). Under torch.func
transforms (grad, vjp), which the custom op does not support, a setup_context-style Function runs
the same functions.
"""
from __future__ import annotations

import torch

_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def eager_safe(args) -> bool:
    """True when ``args`` (an op's arguments) can bypass the custom op: plain eager execution."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0 \
            or torch._C._is_torch_function_mode_enabled():
        return False
    return all(type(a) in _PLAIN_TENSOR_TYPES for a in args if isinstance(a, torch.Tensor))


def zero_grads(likes, needs) -> tuple:
    """Zero gradients shaped like ``likes`` where ``needs`` (None where not needed or where the
    like is None): the backward of an empty output (B, H or W = 0), which the convolutions of the
    backward formulas reject."""
    return tuple(torch.zeros_like(t) if need and t is not None else None
                 for t, need in zip(likes, needs))


class EagerOp:
    """Calls ``custom_op(*args)``, or the same ``forward`` with ``setup_context`` and
    ``backward`` as a ``torch.autograd.Function`` when :func:`eager_safe`. ``args`` must be
    every argument of the op, positionally (defaults included), as the custom op declares them."""

    def __init__(self, custom_op, forward, setup_context, backward):
        self.custom_op = custom_op

        # forward(ctx, *args) rather than a separate setup_context: apply() then binds no
        # signature (inspect.signature on every call costs more than the custom op saves).
        def forward_with_ctx(ctx, *args):
            output = forward(*args)
            setup_context(ctx, args, output)
            return output

        self.function = type(f"{forward.__name__}_eager", (torch.autograd.Function,), {
            "forward": staticmethod(forward_with_ctx),
            "backward": staticmethod(backward),
        })
        # torch.func transforms (grad, vjp, jacrev) need the separate setup_context form: used
        # only under them (the custom op itself does not support them).
        self.transformable = type(f"{forward.__name__}_func", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        })

    def __call__(self, *args):
        if eager_safe(args):
            if torch._C._are_functorch_transforms_active():
                return self.transformable.apply(*args)
            return self.function.apply(*args)
        return self.custom_op(*args)


def not_twice_differentiable(grads, inputs, message: str) -> tuple:
    """``grads`` (a backward's results, None where not needed) from a kernel that is not itself
    differentiable. Under ``create_graph=True`` (grad mode on inside the backward) with any of
    ``inputs`` (the grad outputs and saved tensors) requiring grad, each gradient gets a grad_fn,
    linked to those inputs, that raises ``message`` if a double backward reaches it: it would
    otherwise contribute nothing, silently (``torch.autograd.function.once_differentiable`` links
    to nothing, so ``torch.autograd.grad(..., inputs)`` skips it)."""
    linked = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    present = [i for i, g in enumerate(grads) if g is not None]
    if not torch.is_grad_enabled() or not linked or not present:
        return tuple(grads)
    if torch._C._are_functorch_transforms_active() \
            and (torch._C._functorch.maybe_current_level() or 0) > 1:
        # Nested torch.func transforms (grad of grad): the node below would mark the innermost
        # level only, and the outer one would see a kernel without a derivative (zeros).
        raise RuntimeError(message)
    err_fn = torch._C._functions.DelayedError(message.encode(), len(present) + len(linked))
    wrapped = err_fn(*(grads[i].detach() for i in present), *linked)
    out = list(grads)
    for i, g in zip(present, wrapped):
        out[i] = g
    return tuple(out)
