"""Atomic checkpoints and RNG-state capture for exact resumption.

:func:`save_checkpoint` writes to a temporary file in the destination folder, flushes and fsyncs
it, then ``os.replace``-s it over the destination: a crash at any point leaves either the old file
or the new one, never a truncated one, and the temporary file is removed on failure.
"""
from __future__ import annotations

import os
import random
import secrets

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
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
