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

Under DeepSpeed each process holds its own partition of ZeRO's optimizer state (``train.zero``), and
writes it itself, as ``zero_rankR.safetensors`` (its plain data in the file's metadata), into
``last.tmp/`` before the main process writes ``state.json``: a checkpoint is complete only with every
partition in it. It resumes only under the same ZeRO stage on the same number of processes, which
``optimizer.pt`` records; anything else is refused before anything is restored.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError
from tunesmith.files import fsync_path, write_atomic
from tunesmith.train import distributed, zero
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


def _partition_file(path: Path, rank: int) -> Path:
    return path / f"zero_rank{rank}.safetensors"


def save_checkpoint(checkpoints: Path, model, optimizer, scheduler, state: dict, random_states: list[dict], *,
                    weights: dict | None = None, optimizer_state: dict | None = None,
                    partition: tuple[dict, dict] | None = None, accelerator=None) -> None:
    """Save into ``checkpoints/last``, crash-proof (see the module docstring). ``random_states``: one
    per process, by rank. ``weights`` and ``optimizer_state``: the model's trainable weights and the
    optimizer's state already gathered whole (sharded training, ``distributed.trainable_weights``);
    read from ``model`` and ``optimizer`` when not given.

    Only the main process calls it, except under DeepSpeed: there every process does (it waits for
    the others, twice), with ``partition``, its own part of ZeRO's optimizer state
    (``zero.partition``), and ``accelerator``."""
    main = accelerator is None or accelerator.is_main_process
    tmp, last, old = checkpoints / TMP, checkpoints / LAST, checkpoints / OLD
    if main:
        checkpoints.mkdir(parents=True, exist_ok=True)
        _tidy(checkpoints)
        tmp.mkdir()
    if partition is not None:
        accelerator.wait_for_everyone()  # last.tmp exists
        tensors, plain = partition
        path = _partition_file(tmp, accelerator.process_index)
        save_file(tensors, path, metadata={"zero": json.dumps(plain)})
        fsync_path(path)
        accelerator.wait_for_everyone()  # every partition is written before state.json marks them complete
    if not main:
        return
    if weights is None:
        weights = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, tmp / "trainable.safetensors")
    if partition is not None:
        saved_optimizer = {"zero": {k: partition[1][k] for k in ("stage", "processes")}}
    else:
        saved_optimizer = {"optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state}
    torch.save({**saved_optimizer, "scheduler": scheduler.state_dict(), "rng": random_states}, tmp / "optimizer.pt")
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


def _load_partition(path: Path) -> tuple[dict, dict]:
    """A ZeRO partition's tensors and plain data (safetensors: nothing in it runs)."""
    with safe_open(path, "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, json.loads(f.metadata()["zero"])


def load_checkpoint(checkpoints: Path, model, optimizer, scheduler, rank: int = 0, *,
                    zero_stage: int | None = None, processes: int = 1) -> tuple[dict, dict]:
    """Restore the newest complete checkpoint in ``checkpoints``; returns the loop state and this
    rank's random state. Everything is read and checked before anything is restored. ``zero_stage``:
    the ZeRO stage of a run under DeepSpeed, whose ``processes`` each restore their own partition."""
    path = latest_checkpoint(checkpoints)
    if path is None:
        raise TunesmithError(f"--resume: no complete checkpoint in {checkpoints}")
    extra = _load_plain(path / "optimizer.pt")
    # Every process reads the same record, so that all of them refuse, or none.
    why = zero.mismatch(extra.get("zero"), zero_stage, processes)
    if why:
        raise TunesmithError(f"--resume: checkpoint {path} does not fit this run: {why}")
    if zero_stage is not None:
        # Every process checks every partition, so that a missing one stops all of them alike.
        lacking = [r for r in range(processes) if not _partition_file(path, r).is_file()]
        if lacking:
            raise TunesmithError(f"--resume: checkpoint {path} lacks {_partition_file(path, lacking[0]).name}, "
                                 f"process {lacking[0]}'s part of ZeRO's optimizer state")
    partition = _load_partition(_partition_file(path, rank)) if zero_stage is not None else None
    state = json.loads((path / "state.json").read_text())
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise TunesmithError(f"--resume: checkpoint {path} does not match this model (e.g. {missing[0]})")
    # Whole tensors, sliced as each process holds its parameters when training is sharded.
    distributed.load_weights(model, weights)
    if partition is not None:
        zero.load_partition(optimizer, *partition)
    else:
        distributed.load_optimizer_state(optimizer, extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    states = extra["rng"]
    # Resumed on another number of processes, a rank without a saved state takes the first one's.
    return state, states[rank if rank < len(states) else 0]
