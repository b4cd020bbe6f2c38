"""Argument checks shared by every public op: clear errors that name the argument, what was
expected and what came."""
from __future__ import annotations

import torch

FLOATING = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def require_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def require_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-d tensor {layout}, got shape {tuple(t.shape)}")


def require_dtype(name: str, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        names = ", ".join(dtype_name(d) for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {dtype_name(t.dtype)}")


def require_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({dtype_name(ref.dtype)}), "
                        f"got {dtype_name(t.dtype)}")


def require_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), "
                         f"got {t.device}")


def require_dim_size(name: str, t: torch.Tensor, dim: int, size: int, what: str) -> None:
    if t.shape[dim] != size:
        raise ValueError(f"{name} must have size {size} ({what}) in dimension {dim}, "
                         f"got shape {tuple(t.shape)}")


def tracing() -> bool:
    """True while torch.compile/export traces or a CUDA graph is being captured: value-dependent
    checks (which read tensor contents on the host) are skipped then."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
