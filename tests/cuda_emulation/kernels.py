"""ctypes bindings: call the emulated CUDA launchers on CPU tensors, as csrc/cuda/*.cpp would.

Each wrapper prepares its buffers the way the torch-side launcher does (outputs allocated, backward
buffers zero-filled in the accumulation dtype) and calls one entry point of bindings/*.cpp. Every
tensor crosses through a guarded copy (:class:`_Guarded`): inputs sit between NaN guard zones (an
out-of-bounds read tends to poison the result), outputs between sentinel zones that must come back
untouched (an out-of-bounds write raises); each zone is as large as the tensor it guards.
``offset`` shifts every buffer by that many elements from its allocation, to hand the launchers
misaligned pointers.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

MIN_GUARD = 64  # elements of guard zone on each side of every buffer (at least its own size)
SENTINEL = 1234.5
INT_SENTINEL = -777
MSDA_TYPES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
GHOST_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
COUNTERS = ("launches", "blocks", "threads", "warp_collectives", "block_barriers")


class EmulationError(RuntimeError):
    """A launch failed in the emulator (deadlock, divergent collective, bad configuration...) or a
    kernel wrote outside its output."""


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def _int64s(*values) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def _ints(*values) -> ctypes.Array:
    return (ctypes.c_int * len(values))(*values)


class _Guarded:
    """``t`` copied into a larger flat buffer: ``view`` is the copy (contiguous, same shape)."""

    def __init__(self, t: torch.Tensor, fill: float, offset: int):
        self.fill, self.offset, self.n = fill, offset, t.numel()
        self.guard = max(MIN_GUARD, t.numel())
        self.buffer = torch.full((offset + 2 * self.guard + t.numel(),), fill, dtype=t.dtype)
        self.view = self.buffer[offset + self.guard:offset + self.guard + t.numel()].view(t.shape)
        self.view.copy_(t)

    def check_guards(self, name: str) -> None:
        start = self.offset + self.guard
        for zone in (self.buffer[self.offset:start], self.buffer[start + self.n:]):
            if not torch.equal(zone, torch.full_like(zone, self.fill)):
                raise EmulationError(f"the kernel wrote outside {name}")


def _guarded_input(t: torch.Tensor | None, offset: int) -> _Guarded | None:
    if t is None:
        return None
    poison = float("nan") if t.is_floating_point() else -(2**62)
    return _Guarded(t.contiguous(), poison, offset)


def _output(shape, dtype, offset: int, zero: bool = False) -> _Guarded:
    fill = torch.zeros(shape, dtype=dtype) if zero else torch.full(shape, float("nan"), dtype=dtype)
    return _Guarded(fill, SENTINEL if dtype.is_floating_point else INT_SENTINEL, offset)


class EmulatedKernels:
    """The emulated libraries built by ``build.build()`` (name -> .so path)."""

    def __init__(self, libraries: dict[str, Path]):
        self.libs = {name: ctypes.CDLL(str(path)) for name, path in libraries.items()}
        for lib in self.libs.values():
            lib.gk_emu_error_message.restype = ctypes.c_char_p

    def _check(self, lib: ctypes.CDLL, status: int, what: str) -> None:
        if status != 0:
            message = lib.gk_emu_error_message().decode()
            raise EmulationError(f"{what}: cudaError {status}: {message}")

    def set_sm_count(self, sms: int) -> None:
        """The multiprocessor count the launchers see (sizes their grid-stride grids)."""
        for lib in self.libs.values():
            lib.gk_emu_set_sm_count(sms)

    def set_threads_per_sm(self, threads: int) -> None:
        """The thread slots per multiprocessor the launchers see (0 by default)."""
        for lib in self.libs.values():
            lib.gk_emu_set_threads_per_sm(threads)

    def counters(self, name: str) -> dict[str, int]:
        out = (ctypes.c_longlong * len(COUNTERS))()
        self.libs[name].gk_emu_counters(out)
        return dict(zip(COUNTERS, out))

    # -- conversions (the emulation's own half types, checked against torch) ----------------------

    def convert(self, x: torch.Tensor, to: str) -> torch.Tensor:
        """float32 -> half/bfloat16 bits (int16) or bits -> float32, via the emulation's code."""
        lib = next(iter(self.libs.values()))
        fn = {"half": lib.gk_emu_float_to_half, "bfloat16": lib.gk_emu_float_to_bfloat16,
              "from_half": lib.gk_emu_half_to_float,
              "from_bfloat16": lib.gk_emu_bfloat16_to_float}[to]
        x = x.contiguous()
        out = torch.empty(x.shape, dtype=torch.int16 if x.dtype == torch.float32 else torch.float32)
        fn(_ptr(x), _ptr(out), ctypes.c_longlong(x.numel()))
        return out

    # -- multi-scale deformable attention (csrc/cuda/ms_deform_attn.cpp) --------------------------

    def msda_forward(self, value, spatial_shapes, level_start_index, loc, attn, *, arch=900,
                     offset=0, softmax=False):
        """``softmax``: attn holds logits, softmaxed over the L*P points inside the kernel."""
        name = f"ms_deform_attn_sm{arch // 10}"
        N, S, M, D = value.shape
        _, Lq, _, L, P, _ = loc.shape
        ins = [_guarded_input(t, offset) for t in (value, spatial_shapes, level_start_index, loc,
                                                    attn)]
        out = _output((N, Lq, M * D), value.dtype, offset)
        status = self.libs[name].gk_msda_forward(
            MSDA_TYPES[value.dtype], _int64s(N, S, M, D, Lq, L, P), *(_ptr(g.view) for g in ins),
            ctypes.c_int(int(softmax)), _ptr(out.view))
        self._check(self.libs[name], status, "ms_deform_attn forward")
        out.check_guards("the output")
        return out.view.clone()

    def msda_backward(self, grad_output, value, spatial_shapes, level_start_index, loc, attn, *,
                      arch=900, offset=0, softmax=False, fixed_point_scale=None):
        """``fixed_point_scale`` (a 0-d float64 tensor): the deterministic path, grad_value summed
        in an int64 buffer and divided by the scale afterwards, as csrc/cuda/ms_deform_attn.cpp
        does."""
        name = f"ms_deform_attn_sm{arch // 10}"
        N, S, M, D = value.shape
        _, Lq, _, L, P, _ = loc.shape
        acc = torch.float64 if value.dtype == torch.float64 else torch.float32
        ins = [_guarded_input(t, offset) for t in (grad_output, value, spatial_shapes,
                                                    level_start_index, loc, attn)]
        fixed_point = fixed_point_scale is not None
        grad_value_dtype = torch.int64 if fixed_point else acc
        outs = [_output(value.shape, grad_value_dtype, offset, zero=True)]
        outs += [_output(t.shape, acc, offset, zero=True) for t in (loc, attn)]
        scale = _guarded_input(fixed_point_scale, offset) if fixed_point else None
        status = self.libs[name].gk_msda_backward(
            MSDA_TYPES[value.dtype], _int64s(N, S, M, D, Lq, L, P), *(_ptr(g.view) for g in ins),
            ctypes.c_int(int(softmax)), _ptr(scale.view) if fixed_point else ctypes.c_void_p(None),
            *(_ptr(g.view) for g in outs))
        self._check(self.libs[name], status, "ms_deform_attn backward")
        for g, what in zip(outs, ("grad_value", "grad_sampling_locations",
                                  "grad_attention_weights")):
            g.check_guards(what)
        grads = [g.view.clone() for g in outs]
        if fixed_point:
            grads[0] = (grads[0].double() / fixed_point_scale).to(acc)
        return tuple(grads)

    # -- Ghost ops (csrc/cuda/ghost_ops.cpp) ------------------------------------------------------

    def ghost_conv(self, x, w_primary, b_primary, w_cheap, b_cheap, relu_primary, relu_cheap,
                   out_channels, input_scale=None, gate=None, residual=None, *,
                   channels_last=False, offset=0):
        """x, gate, residual and the result are NCHW tensors; ``channels_last`` selects the
        memory layout the kernel sees (the wrapper permutes in and out)."""
        B, Cin, H, W = x.shape
        C1 = w_primary.shape[0]
        layout = (lambda t: t.permute(0, 2, 3, 1)) if channels_last else (lambda t: t)
        ins = [_guarded_input(t, offset) for t in (layout(x), w_primary, b_primary, w_cheap,
                                                    b_cheap, input_scale)]
        gate_g = _guarded_input(None if gate is None else layout(gate), offset)
        residual_g = _guarded_input(None if residual is None else layout(residual), offset)
        y = _output(tuple(layout(torch.empty(B, out_channels, H, W)).shape), x.dtype, offset)
        gate_hw = gate.shape[2:] if gate is not None else (1, 1)
        lib = self.libs["ghost_ops"]
        status = lib.gk_ghost_conv(
            GHOST_TYPES[x.dtype], *(_ptr(g and g.view) for g in ins), _ptr(gate_g and gate_g.view),
            _ptr(residual_g and residual_g.view), _ptr(y.view),
            _int64s(B, Cin, H, W, C1, out_channels, *gate_hw),
            _ints(relu_primary, relu_cheap, channels_last))
        self._check(lib, status, "ghost_conv")
        y.check_guards("y")
        return y.view.permute(0, 3, 1, 2).clone() if channels_last else y.view.clone()

    def depthwise_conv(self, x, weight, bias, kh, kw, stride, relu, *, channels_last=False,
                       offset=0):
        B, C, H, W = x.shape
        Ho, Wo = ((n + 2 * (k // 2) - k) // stride + 1 for n, k in ((H, kh), (W, kw)))
        layout = (lambda t: t.permute(0, 2, 3, 1)) if channels_last else (lambda t: t)
        ins = [_guarded_input(t, offset) for t in (layout(x), weight, bias)]
        y = _output(tuple(layout(torch.empty(B, C, Ho, Wo)).shape), x.dtype, offset)
        lib = self.libs["ghost_ops"]
        status = lib.gk_depthwise_conv(GHOST_TYPES[x.dtype], *(_ptr(g.view) for g in ins),
                                       _ptr(y.view), _int64s(B, C, H, W, Ho, Wo, kh, kw, stride),
                                       _ints(relu, channels_last))
        self._check(lib, status, "depthwise_conv")
        y.check_guards("y")
        return y.view.permute(0, 3, 1, 2).clone() if channels_last else y.view.clone()

    # -- the emulator's own checks (selftest_kernels.cu) ------------------------------------------

    def selftest(self, case: int, inputs: torch.Tensor, out_numel: int, n: int, a=0, b=0, c=0):
        """Runs launch ``case`` of selftest_kernels.cu; returns its float32 output."""
        x = _guarded_input(inputs.float(), 0)
        out = _output((out_numel,), torch.float32, 0)
        lib = self.libs["selftest"]
        status = lib.gk_selftest(case, _ptr(x.view), _ptr(out.view), n, a, b, c)
        self._check(lib, status, f"selftest case {case}")
        out.check_guards("out")
        return out.view.clone()
