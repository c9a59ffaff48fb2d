"""Training checkpoints: only the trainable weights, plus optimizer, scheduler, random states and
loop state.

A run's ``checkpoints/`` holds ``last/``. A save writes ``last.tmp/``, renames ``last`` to
``last.old`` and ``last.tmp`` to ``last``, then removes ``last.old``. A checkpoint is complete once
its ``state.json`` exists: it is written last, after the other files are fsynced, and removed first
when a checkpoint is thrown away. So a crash or a power loss at any point leaves at least one complete
checkpoint, and ``latest_checkpoint`` (``train.checkpoint_names``, which holds these names without
importing torch) finds the newest: resume, ``Run.has_checkpoint`` and the next save (which tidies
what a crash left) all go through it.

``optimizer.pt`` is unpickled with ``weights_only``, tensors and plain data only: a run directory
copied from elsewhere must not run code on ``--resume``. Every process's random state is kept (CPU
and CUDA), so a resumed run draws the same dropout masks as one never stopped.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError
from tunesmith.files import fsync_path, write_atomic
from tunesmith.train import distributed
from tunesmith.train.checkpoint_names import LAST, OLD, TMP, latest_checkpoint

def _discard(path: Path) -> None:
    """Remove a checkpoint, its state.json first and durably: a crash part-way through the removal
    leaves one that reads as incomplete, never one that reads as complete with files missing."""
    if not path.exists():
        return
    (path / "state.json").unlink(missing_ok=True)
    fsync_path(path)
    shutil.rmtree(path)


def _tidy(checkpoints: Path) -> None:
    """Make ``last`` the newest complete checkpoint and remove the stale ones a crash left behind.
    Nothing complete is removed while it is the only complete checkpoint: an older ``last`` goes only
    once a newer one exists, and the newer one is renamed into its place before ``last.tmp`` and
    ``last.old`` are removed."""
    latest = latest_checkpoint(checkpoints)
    if latest is not None and latest.name != LAST:
        _discard(checkpoints / LAST)
        latest.rename(checkpoints / LAST)
        fsync_path(checkpoints)
    _discard(checkpoints / TMP)
    _discard(checkpoints / OLD)


def save_checkpoint(checkpoints: Path, model, optimizer, scheduler, state: dict, random_states: list[dict], *,
                    weights: dict | None = None, optimizer_state: dict | None = None) -> None:
    """Save into ``checkpoints/last``, crash-proof (see the module docstring). ``random_states``: one
    per process, by rank. ``weights`` and ``optimizer_state``: the model's trainable weights and the
    optimizer's state already gathered whole (sharded training, ``distributed.trainable_weights``);
    read from ``model`` and ``optimizer`` when not given."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    _tidy(checkpoints)
    tmp, last, old = checkpoints / TMP, checkpoints / LAST, checkpoints / OLD
    tmp.mkdir()
    if weights is None:
        weights = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
                "scheduler": scheduler.state_dict(), "rng": random_states}, tmp / "optimizer.pt")
    fsync_path(tmp / "trainable.safetensors")
    fsync_path(tmp / "optimizer.pt")
    write_atomic(tmp / "state.json", json.dumps(state, indent=1))  # last: it marks the rest complete
    if last.exists():
        last.rename(old)
    tmp.rename(last)
    fsync_path(checkpoints)
    _discard(old)


def _load_plain(path: Path) -> dict:
    """``torch.load`` of tensors and plain data only; anything else is refused before it runs."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL (\S+)", str(err))
        raise TunesmithError(
            f"--resume: {path} is not a plain checkpoint: it holds "
            f"{'a ' + named.group(1) if named else 'an object'} where only tensors and plain data belong, "
            "and loading it could run code; refusing it (was the run directory copied from elsewhere?)"
        ) from None


def load_checkpoint(checkpoints: Path, model, optimizer, scheduler, rank: int = 0) -> tuple[dict, dict]:
    """Restore the newest complete checkpoint in ``checkpoints``; returns the loop state and this
    rank's random state. Everything is read and checked before anything is restored."""
    path = latest_checkpoint(checkpoints)
    if path is None:
        raise TunesmithError(f"--resume: no complete checkpoint in {checkpoints}")
    extra = _load_plain(path / "optimizer.pt")
    state = json.loads((path / "state.json").read_text())
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise TunesmithError(f"--resume: checkpoint {path} does not match this model (e.g. {missing[0]})")
    # Whole tensors, sliced as each process holds its parameters when training is sharded.
    distributed.load_weights(model, weights)
    distributed.load_optimizer_state(optimizer, extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    states = extra["rng"]
    # Resumed on another number of processes, a rank without a saved state takes the first one's.
    return state, states[rank if rank < len(states) else 0]
