"""Atomic checkpoints and RNG-state capture for exact resumption.

:func:`save_checkpoint` writes to a temporary file in the destination folder, flushes and fsyncs
it, then ``os.replace``-s it over the destination: a crash at any point leaves either the old file
or the new one, never a truncated one, and the temporary file is removed on failure.
"""
from __future__ import annotations

import dataclasses
import os
import random
import secrets
import shutil

import numpy as np
import torch


def save_checkpoint(state: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Not mkstemp: it creates the file 0600, and the checkpoint would replace a readable one
    # with one only its owner can read; 0666 minus the umask is what torch.save would create.
    tmp = os.path.join(folder, f"{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(exc, (OSError, RuntimeError)):  # KeyboardInterrupt...: as they are
            raise
        # torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected
        # pos": say which file, and how much room is left there
        free = shutil.disk_usage(folder).free / 2**20
        hint = "" if isinstance(exc, PermissionError) else ": is the disk full?"
        raise OSError(f"cannot write checkpoint {path} ({free:.1f} MiB free in {folder}{hint}): "
                      f"{type(exc).__name__}: {exc}") from exc


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that is not an rtdetr checkpoint."""


# What `Trainer.state_dict()` writes and `--resume` needs.
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "global_step",
               "step_in_epoch", "losses", "rng")


def load_checkpoint(path: str, map_location="cpu", resume: bool = False) -> dict:
    """The dict a training run saved at ``path``. A truncated or corrupt file, or one that is not
    an rtdetr checkpoint (a dict with ``model``; with ``resume``, every entry exact resumption
    needs), is a :class:`CheckpointError` naming the file. The file is unpickled in full (RNG
    states, configs): load only checkpoints you trust, as with any ``torch.load`` of a pickle."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint must be a file, got the folder {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - zip, pickle and OS errors alike: say which file
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt file?): "
                              f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state:
        what = f"a dict with keys {sorted(map(str, state))[:8]}" if isinstance(state, dict) \
            else f"a {type(state).__name__}"
        raise CheckpointError(f"{path} is not an rtdetr checkpoint (a dict with 'model', as "
                              f"`rtdetr train` writes): it holds {what}")
    missing = [k for k in RESUME_KEYS if k not in state] if resume else []
    if missing:
        raise CheckpointError(f"cannot resume from {path}: it lacks {missing} (not a checkpoint "
                              f"written by `rtdetr train`?)")
    return state


def _flat(tree, prefix: str = "") -> dict:
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        tree = dataclasses.asdict(tree)
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def load_model_weights(model, weights: dict, path: str, state: dict | None = None,
                       model_cfg=None) -> None:
    """``model.load_state_dict(weights)``, where the weights of another model (a checkpoint of
    another config, or other ``model.*`` overrides) are a :class:`CheckpointError` naming the
    file, the ``model.*`` settings that differ from the checkpoint's and the fix, instead of
    PyTorch's list of every mismatched tensor."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        if "Error(s) in loading state_dict" not in str(exc):
            raise
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        saved = ((state or {}).get("config") or {}).get("model")
        diff = []
        if saved is not None and model_cfg is not None:
            old, new = _flat(saved, "model."), _flat(model_cfg, "model.")
            diff = [f"{k}={new.get(k)!r} (checkpoint: {old.get(k)!r})"
                    for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        what = (f"its model differs in {', '.join(diff[:6])}" + (", ..." if len(diff) > 6 else "")
                if diff else f"{len(details)} mismatched tensors, e.g. {details[0][:200]}"
                if details else str(exc)[:200])
        raise CheckpointError(f"the weights in {path} do not fit this model ({what}): the "
                              f"checkpoint was trained with another model config; omit --config "
                              f"and model.* overrides to use the config stored in the "
                              f"checkpoint") from None


def capture_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """RNG states must be CPU ByteTensors: a checkpoint loaded with ``map_location`` a GPU holds
    them on that GPU, which ``torch.set_rng_state`` refuses."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
