"""Backend registry and selection.

Every op has one implementation per backend:

- ``reference``: pure PyTorch; defines the op; any device, float64 included.
- ``cpu``: C++ kernels of the compiled extension (``ghostkernels._C``), CPU tensors.
- ``triton``: Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
- ``cuda``: CUDA C++ kernels of the compiled extension, CUDA tensors.

Selection, per call: the innermost :func:`use_backend` context, else the ``GHOSTKERNELS_BACKEND``
environment variable, else automatic (the fastest backend that supports the tensor's device and
dtype; inside :func:`prefer_backend`, the preferred backend wherever it can run the call; for a
call whose shapes :func:`ghostkernels.tune` measured, the backend it found fastest). A backend
chosen explicitly that cannot run the call is an error, never a silent fallback.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "GHOSTKERNELS_BACKEND"

# Fastest first; the first one that is available and supports the call wins. An op may override
# the order for a device type where measurements say otherwise (set_auto_order).
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_OP_AUTO_ORDER: dict[tuple[str, str], tuple[str, ...]] = {}
# Measured per call shape (ghostkernels.tuning): (op, device type, dtype, call_key) -> backend.
_TUNED: dict[tuple, str] = {}

# Per thread: the use_backend and prefer_backend stacks, the decomposed() depth, and the dict
# recording_calls() fills (tuning records the calls of its own thread only).
_state = threading.local()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str


@functools.lru_cache(maxsize=None)
def compiled_extension():
    """The compiled ``ghostkernels._C`` module, or None when it is not built."""
    try:
        return importlib.import_module("ghostkernels._C")
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def _extension_error() -> str:
    try:
        importlib.import_module("ghostkernels._C")
    except ImportError as exc:  # pragma: no cover - message depends on the machine
        return str(exc)
    return ""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unavailable
        return f"{type(exc).__name__}: {exc}"
    return ""


def availability(backend: str, device_type: str | None = None) -> Availability:
    """Whether ``backend`` can run on ``device_type`` ("cpu"/"cuda"; None: on any), and why not."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return Availability(True, "pure PyTorch")
    if backend in ("cpu", "cuda"):
        ext = compiled_extension()
        if ext is None:
            return Availability(False, "compiled extension ghostkernels._C not importable: "
                                       f"{_extension_error()} (pip install with a C++ compiler)")
        if backend == "cpu":
            if device_type not in (None, "cpu"):
                return Availability(False, "the cpu backend runs CPU tensors only")
            return Availability(True, "ghostkernels._C C++ kernels")
        if not getattr(ext, "WITH_CUDA", 0):
            return Availability(False, "ghostkernels._C was built without CUDA "
                                       "(needs a CUDA build of torch and nvcc/CUDA_HOME at build time)")
        if device_type == "cpu":
            return Availability(False, "the cuda backend runs CUDA tensors only")
        if not torch.cuda.is_available():
            return Availability(False, "built with CUDA, but no CUDA device is visible")
        return Availability(True, "ghostkernels._C CUDA kernels")
    # triton
    err = _triton_import_error()
    if err:
        return Availability(False, f"triton not importable: {err}")
    if device_type == "cpu" or (device_type is None and not torch.cuda.is_available()):
        if triton_interpret():
            return Availability(True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)")
        return Availability(False, "no CUDA device (CPU tensors need TRITON_INTERPRET=1, "
                                   "set before importing ghostkernels)")
    if not torch.cuda.is_available():
        return Availability(False, "no CUDA device visible")
    return Availability(True, "Triton kernels on CUDA")


def report() -> dict[str, dict[str, Availability]]:
    """Availability of every backend on every device type: ``{device: {backend: Availability}}``."""
    return {dev: {b: availability(b, dev) for b in BACKENDS} for dev in ("cpu", "cuda")}


def format_report() -> str:
    lines = [f"ghostkernels backends (torch {torch.__version__}, "
             f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'})"]
    for dev, backends in report().items():
        lines.append(f"  {dev} tensors:")
        for name, av in backends.items():
            lines.append(f"    {name:<9} {'yes' if av.available else 'no ':<3}  {av.reason}")
        auto = [b for b in _AUTO_ORDER[dev] if backends[b].available]
        lines.append(f"    automatic choice: {auto[0] if auto else 'none'}")
        for op in sorted(_REGISTRY):
            first = [b for b in auto_order(op, dev)
                     if backends[b].available and b in _REGISTRY[op]]
            if auto and first and first[0] != auto[0]:
                why = ("measured faster" if (op, dev) in _OP_AUTO_ORDER
                       else f"{auto[0]} has no {op} kernel")
                lines.append(f"      except {op}: {first[0]} ({why})")
    forced = requested_backend()
    if forced:
        lines.append(f"  forced backend: {forced}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Per-op implementations


@dataclass(frozen=True)
class Implementation:
    module: str  # module path, imported on first use (Triton modules are slow to import)
    dtypes: tuple[torch.dtype, ...]

    def load(self):
        return importlib.import_module(self.module)


_REGISTRY: dict[str, dict[str, Implementation]] = {}


def register(op: str, backend: str, module: str, dtypes) -> None:
    """Declare that ``module`` implements ``op`` for ``backend`` and ``dtypes``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = Implementation(module, tuple(dtypes))


def implementations(op: str) -> dict[str, Implementation]:
    return dict(_REGISTRY[op])


def set_auto_order(op: str, device_type: str, order) -> None:
    """Automatic choice for ``op`` on ``device_type``: ``order`` fastest first (measured)."""
    bad = [b for b in order if b not in BACKENDS]
    if bad or not order:
        raise ValueError(f"order must be a non-empty sequence of {BACKENDS}, got {order!r}")
    _OP_AUTO_ORDER[(op, device_type)] = tuple(order)


def auto_order(op: str, device_type: str) -> tuple[str, ...]:
    return _OP_AUTO_ORDER.get((op, device_type), _AUTO_ORDER.get(device_type, ("reference",)))


def requested_backend() -> str | None:
    """The backend forced by :func:`use_backend` or the environment, or None for automatic."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in ("", "auto"):
        return None
    if env not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS} or 'auto', got {env!r}")
    return env


@contextlib.contextmanager
def use_backend(backend: str | None) -> Iterator[None]:
    """Force ``backend`` ("reference", "cpu", "triton", "cuda"; None or "auto" = automatic)."""
    if backend is not None and backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, 'auto' or None, got {backend!r}")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    # An explicit "auto" inside a forced block returns to automatic selection.
    stack.append(None if backend == "auto" else backend)
    try:
        yield
    finally:
        stack.pop()


@contextlib.contextmanager
def prefer_backend(backend: str) -> Iterator[None]:
    """Automatic choice, except that every op that ``backend`` implements for the call's device
    and dtype runs on it; the others keep their automatic choice. For running one backend's
    kernels inside a model whose ops it does not all implement (e.g. the CUDA kernels, where the
    SE excitation exists only in Triton). :func:`use_backend` and the environment still win."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    stack = getattr(_state, "preferred", None)
    if stack is None:
        stack = _state.preferred = []
    stack.append(backend)
    try:
        yield
    finally:
        stack.pop()


def preferred_backend() -> str | None:
    """The backend of the innermost :func:`prefer_backend` on this thread, or None."""
    stack = getattr(_state, "preferred", None)
    return stack[-1] if stack else None


def current_choice() -> tuple[str | None, str | None]:
    """``(requested_backend(), preferred_backend())``: what an op's setup_context saves so that
    its backward chooses as the forward did (:func:`choosing`). Both are per thread, and autograd
    runs the backward of CUDA tensors on a thread of its own."""
    return requested_backend(), preferred_backend()


def choosing(forced: str | None, preferred: str | None):
    """A context in which the choice :func:`current_choice` returned is in force (None or "":
    whatever is in force here). Forcing wins over preferring, so at most one is entered."""
    if forced:
        return use_backend(forced)
    return prefer_backend(preferred) if preferred else contextlib.nullcontext()


@contextlib.contextmanager
def decomposed() -> Iterator[None]:
    """Inside this context the public ops bypass their custom op and call the reference
    implementation directly, so tracers see plain PyTorch ops (grid_sample, conv2d): used for
    ONNX export, where standard runtimes and TensorRT know those ops but not ours."""
    depth = getattr(_state, "decomposed", 0)
    _state.decomposed = depth + 1
    try:
        yield
    finally:
        _state.decomposed = depth


def decomposing() -> bool:
    return getattr(_state, "decomposed", 0) > 0


def _supports(op: str, backend: str, device_type: str, dtype: torch.dtype) -> str:
    """Empty string when ``backend`` can run ``op`` here, else the reason it cannot."""
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return f"{backend} has no implementation of {op}"
    av = availability(backend, device_type)
    if not av.available:
        return av.reason
    if dtype not in impl.dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in impl.dtypes)
        return f"{backend} implements {op} for {names}, not {str(dtype).replace('torch.', '')}"
    return ""


def runnable_backends(op: str, device_type: str, dtype: torch.dtype) -> list[str]:
    """The backends (in ``BACKENDS`` order) that can run ``op`` on ``device_type`` tensors of
    ``dtype`` here: implemented, available, and implemented for that dtype."""
    if op not in _REGISTRY:
        raise ValueError(f"op must be one of {sorted(_REGISTRY)}, got {op!r}")
    return [b for b in BACKENDS if not _supports(op, b, device_type, dtype)]


def call_key(args, kwargs=None) -> tuple:
    """What a tuned choice is keyed on: the shape and layout of each tensor argument and the value
    of every other one (bools, ints, None)."""
    def one(a):
        if isinstance(a, torch.Tensor):
            layout = ("channels_last" if a.dim() == 4 and not a.is_contiguous()
                      and a.is_contiguous(memory_format=torch.channels_last) else "")
            return (tuple(a.shape), layout) if layout else tuple(a.shape)
        return a
    key = tuple(one(a) for a in args)
    return key + tuple((k, one(v)) for k, v in sorted(kwargs.items())) if kwargs else key


def check_forced(op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """The forced backend (:func:`requested_backend`; None: automatic), after checking that it can
    run ``op`` here (:class:`BackendUnavailableError` if not). Ops call it where they return
    early without a backend (empty inputs): the error must not depend on the input's size."""
    forced = requested_backend()
    if forced is not None:
        why = _supports(op, forced, device.type, dtype)
        if why:
            raise BackendUnavailableError(
                f"backend {forced!r} was requested for ghostkernels.{op} on {device.type} "
                f"{str(dtype).replace('torch.', '')} tensors but cannot run it: {why}")
    return forced


def select(op: str, device: torch.device, dtype: torch.dtype, key: tuple | None = None) -> str:
    """The backend that runs ``op`` for tensors on ``device`` with ``dtype`` (``key``: the call's
    :func:`call_key`, for choices measured per call shape)."""
    forced = check_forced(op, device, dtype)
    if forced is not None:
        return forced
    # Automatic: the preferred backend, then the one measured for this call shape, then the order.
    device_type = device.type
    first = (preferred_backend(),
             _TUNED.get((op, device_type, dtype, key)) if key is not None else None)
    for backend in (*first, *auto_order(op, device_type)):
        if backend is not None and not _supports(op, backend, device_type, dtype):
            return backend
    return "reference"


@torch.compiler.assume_constant_result
def _chosen_when_traced(op: str, device_type: str, dtype: torch.dtype) -> str:
    return select(op, torch.device(device_type), dtype)


def wants_plain_ops(op: str, x: torch.Tensor) -> bool:
    """Whether a public op should run its reference's plain PyTorch ops rather than its custom op:
    for exporters (:func:`decomposed`), and while torch.compile traces a call of ``op`` on ``x``
    whose chosen backend is the reference anyway, so that the compiler can fuse those ops rather
    than run them inside an opaque custom op (the backend is chosen once, when the graph is
    traced)."""
    if decomposing():
        return True
    return (torch.compiler.is_compiling()
            and _chosen_when_traced(op, x.device.type, x.dtype) == "reference")


def resolve(op: str, device: torch.device, dtype: torch.dtype, args=None, kwargs=None):
    """The implementation module of the selected backend for ``op``. ``args``/``kwargs``: what
    the caller will pass to the module's ``forward`` (so that choices measured per call shape
    apply, and :mod:`ghostkernels.tuning` can record the call)."""
    key = None
    recorder = getattr(_state, "recorder", None)
    if args is not None and (_TUNED or recorder is not None):
        key = call_key(args, kwargs)
        if recorder is not None and (op, device.type, dtype, key) not in recorder:
            def keep(a):  # a copy: the caller's tensors may change after the call
                return a.detach().clone() if isinstance(a, torch.Tensor) else a
            recorder[(op, device.type, dtype, key)] = (
                tuple(keep(a) for a in args), {k: keep(v) for k, v in (kwargs or {}).items()})
    return _REGISTRY[op][select(op, device, dtype, key)].load()


def install_tuned(op: str, device_type: str, dtype: torch.dtype, key: tuple, backend: str) -> None:
    """Run calls of ``op`` with this device type, dtype and :func:`call_key` on ``backend`` when
    the choice is automatic (what :func:`ghostkernels.tune` measured fastest)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _TUNED[(op, device_type, dtype, key)] = backend


def clear_tuned() -> None:
    """Forget every measured per-call choice (back to the automatic order)."""
    _TUNED.clear()


@contextlib.contextmanager
def recording_calls() -> Iterator[dict]:
    """Inside: the first op call of every (op, device type, dtype, :func:`call_key`) that
    resolves a backend with its arguments is stored in the yielded dict, mapped to a copy of its
    ``(args, kwargs)`` (used by ghostkernels.tuning). Only this thread's calls: another thread's
    calls (or its own ``tune()``) are not this recording's."""
    if getattr(_state, "recorder", None) is not None:
        raise RuntimeError("ghostkernels is already recording op calls (nested tune())")
    _state.recorder = recorder = {}
    try:
        yield recorder
    finally:
        _state.recorder = None


def backend_for(op: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """Public helper: which backend would run ``op`` now (for logs and benchmarks)."""
    if op not in _REGISTRY:  # select() would answer "reference" for any name
        raise ValueError(f"op must be one of {sorted(_REGISTRY)}, got {op!r}")
    if not isinstance(dtype, torch.dtype):  # likewise for any dtype it does not know
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    return select(op, torch.device(device), dtype)

