"""Training checkpoints: only the trainable weights, plus optimizer, scheduler, random states and
loop state.

Written to a temporary directory and renamed into place, so a crash while saving leaves the
previous checkpoint intact rather than half of a new one. Every process's random state is kept
(CPU and CUDA), so a resumed run draws the same dropout masks as one never stopped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError


def save_checkpoint(path: Path, model, optimizer, scheduler, state: dict, random_states: list[dict]) -> None:
    """``random_states``: one per process, by rank."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": random_states},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> tuple[dict, dict]:
    """Restore what ``save_checkpoint`` saved; returns the loop state and this rank's random state."""
    if not (path / "state.json").is_file():
        raise TunesmithError(f"--resume: no checkpoint at {path}")
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise TunesmithError(f"--resume: checkpoint {path} does not match this model (e.g. {missing[0]})")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    extra = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    states = extra["rng"]
    # Resumed on another number of processes, a rank without a saved state takes the first one's.
    return json.loads((path / "state.json").read_text()), states[rank if rank < len(states) else 0]
