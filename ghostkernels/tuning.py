"""Backend choice measured per call shape on this machine (opt-in): ``ghostkernels.tune``.

The automatic choice is one order of backends per op and device type, measured once on one card
(BENCHMARKS.md). Which kernel is fastest differs by shape (cuDNN's convolutions win some Ghost
shapes at batch 1, the fused kernels others), by batch and by card. ``tune(fn, *args)`` runs
``fn(*args)`` once (under ``torch.no_grad``) with the automatic choice, recording the first call
of every ghostkernels op shape it makes; then runs each recorded call on every backend that can
run it, checks the result against the reference backend's, times it (on a GPU as replays of a
CUDA graph of the call, so that host launch overhead does not decide), and installs the fastest as
the automatic choice for calls of that op with that shape (``backends.call_key``: the tensors'
shapes and layouts, the other arguments' values), dtype and device type. Afterwards ``fn`` and
anything else making those calls run on the measured winners; ``use_backend`` and
``prefer_backend`` still override. Typical use: once after building and folding a model, before
capturing it in a CUDA graph (the choice is made on the host, so graphs capture the tuned kernels).
:func:`save` and :func:`load` keep the choices across processes (per device name).

Only the forward kernels are tuned (the deployment path); backward kernels keep the automatic
order. Under torch.compile the custom ops run their tuned choice too; only the decision to trace
an op whose automatic choice is the reference as plain PyTorch ops (so that inductor can fuse
them) is made from the automatic order, when the graph is traced.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ghostkernels import backends
from ghostkernels.benchmark import cuda_graph_replay

# Relative error (in the Frobenius norm) a backend's output may have against the reference
# backend's on the same inputs: both carry the dtype's rounding, so this is about twice the
# per-backend tolerance of the tests (tests/backend_params.py); float32 allows for TF32, which
# cuDNN's convolutions (the reference backend of the Ghost ops) use by default on a GPU. A
# broken kernel is off by far more.
AGREEMENT = {torch.float64: 1e-9, torch.float32: 2e-3, torch.float16: 5e-3,
             torch.bfloat16: 4e-2}


@dataclass
class TunedCall:
    """One measured call shape: the backend installed, each candidate's time, and why any
    candidate was not considered."""
    op: str
    device_type: str
    dtype: torch.dtype
    key: tuple
    backend: str = ""
    ms: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        times = ", ".join(f"{b} {t:.4f}" for b, t in sorted(self.ms.items(), key=lambda i: i[1]))
        skipped = "; ".join(f"{b}: {why[:60]}" for b, why in self.rejected.items())
        dtype = str(self.dtype).replace("torch.", "")
        return (f"{self.op} {dtype} {self.key}: {self.backend} ({times} ms)"
                + (f"; not used: {skipped}" if skipped else ""))


def _outputs(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if isinstance(t, torch.Tensor)]


def _disagreement(out, expected) -> float:
    worst = 0.0
    for o, e in zip(_outputs(out), _outputs(expected)):
        o, e = o.detach().double().cpu(), e.detach().double().cpu()
        if o.shape != e.shape:
            return float("inf")
        worst = max(worst, float((o - e).norm() / e.norm().clamp_min(1e-30)))
    return worst


def _time_ms(call, device_type: str, repeats: int, warmup: int) -> float:
    """Milliseconds of one ``call()``.

    On a GPU the call is captured in a CUDA graph and the graph replayed ``repeats`` times back
    to back between two CUDA events (the mean): the GPU time of the call without host launch
    gaps, which is what a model captured in a CUDA graph pays. Timed eagerly, a small call's
    host time would decide (the reference backend's several PyTorch ops each cost their launch on
    the host). A call that cannot be captured is timed eagerly: the median of single calls
    between CUDA events. On the CPU: the median wall time of single calls."""
    for _ in range(warmup):
        call()
    if device_type == "cuda":
        replay = _captured(call)
        torch.cuda.synchronize()
        if replay is not None:
            replay()  # the first replay uploads the graph
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / repeats
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _captured(call):
    """The ``replay`` of ``call()`` captured in a CUDA graph, or None when it cannot be
    captured."""
    try:
        return cuda_graph_replay(call, warmup=1)
    except RuntimeError:  # e.g. a host synchronisation inside the call
        return None


def tune(fn, *args, candidates=backends.BACKENDS, repeats: int = 10, warmup: int = 2,
         **kwargs) -> list[TunedCall]:
    """Measure every backend on every op call shape ``fn(*args, **kwargs)`` makes and install
    the fastest that agrees with the reference backend (module docstring). ``candidates``: the
    backends to consider (those that cannot run a call are skipped). Returns one
    :class:`TunedCall` per call shape. Tuning again re-measures and replaces those entries.
    Triton on CPU tensors (its interpreter) is never a candidate. The calls are recorded on this
    thread only (``backends.recording_calls``): other threads' calls meanwhile are not measured,
    and other threads may tune at the same time."""
    bad = [b for b in candidates if b not in backends.BACKENDS]
    if bad:
        raise ValueError(f"candidates must be among {backends.BACKENDS}, got {bad}")
    for name, value, least in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    with backends.recording_calls() as calls, torch.no_grad():
        fn(*args, **kwargs)
    results = []
    for (op, device_type, dtype, key), (call_args, call_kwargs) in calls.items():
        entry = TunedCall(op, device_type, dtype, key)
        modules = {}
        for backend in candidates:
            why = backends._supports(op, backend, device_type, dtype)
            if not why and backend == "triton" and device_type == "cpu":
                why = "the Triton interpreter (TRITON_INTERPRET=1) is a correctness tool: not timed"
            if why:
                entry.rejected[backend] = why
            else:
                modules[backend] = backends.implementations(op)[backend].load()
        with torch.no_grad():
            expected = None  # the reference backend's output (it runs first: see below)
            for backend, module in sorted(modules.items(), key=lambda m: m[0] != "reference"):
                def call(module=module):
                    return module.forward(*call_args, **call_kwargs)
                try:
                    out = call()
                except Exception as exc:  # noqa: BLE001 - a failing kernel is reported, not fatal
                    entry.rejected[backend] = f"{type(exc).__name__}: {exc}"
                    continue
                if backend == "reference":
                    expected = out
                elif expected is not None:
                    err = _disagreement(out, expected)
                    if not err <= AGREEMENT.get(dtype, 1e-4):
                        entry.rejected[backend] = f"disagrees with the reference ({err:.2e})"
                        continue
                entry.ms[backend] = _time_ms(call, device_type, repeats, warmup)
        if entry.ms:
            entry.backend = min(entry.ms, key=entry.ms.get)
            backends.install_tuned(op, device_type, dtype, key, entry.backend)
        results.append(entry)
    return results


def clear() -> None:
    """Back to the automatic order for every call shape (forget what :func:`tune` installed)."""
    backends.clear_tuned()


def summary(entries: list[TunedCall]) -> str:
    """How many call shapes went to each backend, per op: ``"ghost_conv=cuda x12, ..."``."""
    picked = collections.Counter(f"{e.op}={e.backend}" for e in entries if e.backend)
    return ", ".join(f"{k} x{n}" for k, n in sorted(picked.items()))


@contextlib.contextmanager
def tuned_for(fn, *args, **kwargs) -> Iterator[list[TunedCall]]:
    """:func:`tune` on ``fn(*args, **kwargs)`` for the duration of the block (yields its
    entries); afterwards the choices installed before it are back, as they were. The installed
    choices are process-wide (they apply to every thread's calls): two threads in ``tuned_for``
    blocks at once see each other's choices and restore each other's state (a benchmark helper,
    not for concurrent use)."""
    before = dict(backends._TUNED)
    clear()
    try:
        yield tune(fn, *args, **kwargs)
    finally:
        clear()
        backends._TUNED.update(before)


@functools.lru_cache(maxsize=None)
def _device_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    return _cpu_model() or platform.processor() or platform.machine()


def _cpu_model() -> str:
    """The CPU's model name on Linux ("" elsewhere): platform.processor() says only "x86_64",
    which would make a tuning file from any x86 CPU count as measured on this one."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def save(path) -> int:
    """Write the installed per-shape choices to ``path`` (JSON, with the device each was measured
    on), e.g. once after :func:`tune`, so a serving process can :func:`load` them instead of
    measuring again. Returns how many were written; the file is replaced atomically."""
    # A snapshot first: another thread's tune() may install choices meanwhile (a dict changing
    # size while it is iterated raises); list() of the items copies it under the GIL.
    entries = [{"op": op, "device_type": device_type, "device": _device_name(device_type),
                "dtype": str(dtype).replace("torch.", ""), "key": key, "backend": backend}
               for (op, device_type, dtype, key), backend in list(backends._TUNED.items())]
    # a temporary file of this call's own, so that saves to one path at once do not interleave
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump({"format": "ghostkernels-tuning-1", "entries": entries}, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return len(entries)


def load(path, any_device: bool = False) -> int:
    """Install the choices :func:`save` wrote to ``path``; returns how many. Choices measured on
    another device (by name) are refused with a ValueError unless ``any_device``: the fastest
    kernel differs between cards."""
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != "ghostkernels-tuning-1":
            raise ValueError(f"format {data.get('format')!r}, expected 'ghostkernels-tuning-1'")
        entries = [(e["op"], e["device_type"], e["device"], getattr(torch, e["dtype"]),
                    _as_tuple(e["key"]), e["backend"]) for e in data["entries"]]
        if not all(isinstance(e[3], torch.dtype) for e in entries):
            raise ValueError("an entry's dtype is not a torch dtype")
        for entry in entries:  # a key (or name) that JSON gave as an object or a list in a
            hash(entry)        # place of a tuple cannot be installed: TypeError, caught below
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a ghostkernels tuning file ({type(exc).__name__}: "
                         f"{exc})") from exc
    for op, device_type, device, dtype, key, backend in entries:  # all checked before any is used
        if not any_device and device != _device_name(device_type):
            raise ValueError(f"{path}: measured on {device!r}, this {device_type} device is "
                             f"{_device_name(device_type)!r} (pass any_device=True to use it)")
        if op not in backends._REGISTRY:
            raise ValueError(f"{path}: unknown op {op!r}")
        if backend not in backends.BACKENDS:
            raise ValueError(f"{path}: unknown backend {backend!r}")
    for op, device_type, _, dtype, key, backend in entries:
        backends.install_tuned(op, device_type, dtype, key, backend)
    return len(entries)
