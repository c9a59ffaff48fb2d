"""Checkpoints that are safe and crash-proof (issue 23).

- ``optimizer.pt`` is read as tensors and plain data only: a planted pickle is refused, unrun.
- A crash at any point of a save leaves a complete checkpoint that resume finds, and the next save
  tidies what the crash left without ever removing the only complete one.
- ``write_atomic`` fsyncs the file before its rename and the directory after.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import tunesmith.train.checkpoint as checkpoint
from conftest import cli_fails, write_config
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.files import write_atomic
from tunesmith.recipe import run_training
from tunesmith.store import Run
from tunesmith.train import distributed
from tunesmith.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


# A tiny model, optimizer and schedule, and what a save and a load do with them.

def _parts(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _train_step(model, optimizer, scheduler) -> dict[str, torch.Tensor]:
    """One optimizer step; returns the weights after it."""
    ids = torch.arange(3, 15).unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _save(checkpoints: Path, parts, step: int) -> None:
    save_checkpoint(checkpoints, *parts, {"step": step}, [distributed.random_state()])


def _resume(checkpoints: Path, parts) -> tuple[int, dict[str, torch.Tensor]]:
    """What a resumed run starts from: the step and the weights, loaded into ``parts`` (every
    weight of which a checkpoint holds, so none is left from before)."""
    state, _ = load_checkpoint(checkpoints, *parts)
    return state["step"], {n: p.detach().clone() for n, p in parts[0].named_parameters()}


def _assert_same(weights: dict, expected: dict) -> None:
    assert weights.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=0, atol=0, msg=name)


# Unpickling only tensors and plain data.

class _Planted:
    """What a hostile run directory could hold: unpickling it opens (so creates) ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_checkpoint_loads_with_only_tensors_and_plain_data(tmp_path, tiny_model_dir):
    parts = _parts(tiny_model_dir)
    weights = _train_step(*parts)
    _save(tmp_path / "checkpoints", parts, 1)
    saved = torch.load(tmp_path / "checkpoints" / "last" / "optimizer.pt", weights_only=True)
    assert saved["optimizer"]["state"] and saved["rng"][0]["cpu"].dtype == torch.uint8
    step, restored = _resume(tmp_path / "checkpoints", _parts(tiny_model_dir))
    assert step == 1
    _assert_same(restored, weights)


def test_a_planted_pickle_in_optimizer_pt_is_refused_and_never_runs(tmp_path, tiny_model_dir):
    parts = _parts(tiny_model_dir)
    _train_step(*parts)
    checkpoints = tmp_path / "checkpoints"
    _save(checkpoints, parts, 1)
    marker = tmp_path / "payload-ran"
    planted = checkpoints / "last" / "optimizer.pt"
    torch.save({"optimizer": _Planted(marker), "scheduler": {}, "rng": []}, planted)

    with pytest.raises(TunesmithError) as refused:
        load_checkpoint(checkpoints, *_parts(tiny_model_dir))
    assert not marker.exists(), "unpickling optimizer.pt ran the planted code"
    message = str(refused.value)
    assert str(planted) in message and "not a plain checkpoint" in message
    assert "open" in message  # what was planted, so the user can tell a hostile file from a damaged one


# Crashes while saving.

class Crash(BaseException):
    """A process killed mid-save: nothing after it runs, and nothing catches it."""


def test_a_crash_between_the_renames_resumes_from_the_newest_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    run = Run(tmp_path / "run")
    parts = _parts(tiny_model_dir)
    _train_step(*parts)
    _save(run.checkpoints, parts, 1)
    at_2 = _train_step(*parts)
    rename = Path.rename

    def killed_before_the_second_rename(self, target):
        if self.name == "last.tmp":
            raise Crash
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_the_second_rename)
    with pytest.raises(Crash):
        _save(run.checkpoints, parts, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["last.old", "last.tmp"]

    assert run.has_checkpoint()
    step, weights = _resume(run.checkpoints, _parts(tiny_model_dir))
    assert step == 2
    _assert_same(weights, at_2)

    # The next save leaves only its own checkpoint.
    at_3 = _train_step(*parts)
    _save(run.checkpoints, parts, 3)
    assert [p.name for p in run.checkpoints.iterdir()] == ["last"]
    step, weights = _resume(run.checkpoints, _parts(tiny_model_dir))
    assert step == 3
    _assert_same(weights, at_3)


def test_a_crash_while_writing_the_new_checkpoint_keeps_the_older_one(tmp_path, tiny_model_dir, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    parts = _parts(tiny_model_dir)
    at_1 = _train_step(*parts)
    _save(checkpoints, parts, 1)
    _train_step(*parts)

    def killed_before_state_json(path, text):
        raise Crash

    monkeypatch.setattr(checkpoint, "write_atomic", killed_before_state_json)
    with pytest.raises(Crash):
        _save(checkpoints, parts, 2)
    monkeypatch.undo()
    partial = checkpoints / "last.tmp"
    assert (partial / "trainable.safetensors").is_file() and not (partial / "state.json").exists()

    assert latest_checkpoint(checkpoints) == checkpoints / "last"
    step, weights = _resume(checkpoints, _parts(tiny_model_dir))
    assert step == 1
    _assert_same(weights, at_1)


def _crash_at(monkeypatch, when: int) -> list[str]:
    """Make the ``when``-th change that a save makes to the disk a crash (``when`` < 0: none);
    returns the list of changes, which grows as the save goes. A crash in ``shutil.rmtree`` removes one
    file first, as a process killed part-way through a removal would."""
    done: list[str] = []

    def wrap(name, real, partial=None):
        def changed(*args, **kwargs):
            done.append(name)
            if len(done) - 1 == when:
                if partial:
                    partial(*args)
                raise Crash
            return real(*args, **kwargs)
        return changed

    def remove_one_file(path, *_):
        files = sorted(f for f in Path(path).iterdir() if f.is_file())
        if files:
            os.unlink(files[0])

    monkeypatch.setattr(Path, "rename", wrap("rename", Path.rename))
    monkeypatch.setattr(Path, "mkdir", wrap("mkdir", Path.mkdir))
    monkeypatch.setattr(Path, "unlink", wrap("unlink", Path.unlink))
    monkeypatch.setattr(checkpoint.shutil, "rmtree", wrap("rmtree", shutil.rmtree, remove_one_file))
    monkeypatch.setattr(checkpoint, "save_file", wrap("save_file", checkpoint.save_file))
    monkeypatch.setattr(checkpoint.torch, "save", wrap("torch.save", torch.save))
    monkeypatch.setattr(checkpoint, "write_atomic", wrap("write_atomic", write_atomic))
    return done


def test_a_crash_at_any_point_of_two_saves_in_a_row_leaves_the_newest_complete_checkpoint(
        tmp_path, tiny_model_dir, monkeypatch):
    """Every change a save makes to the disk, crashed at in turn; then, from what that left, a second
    save crashed at each of its changes in turn. Resume must always find a complete checkpoint that
    is no older than the last one found, and a clean save afterwards must leave only ``last``."""
    parts = _parts(tiny_model_dir)
    weights = {step: _train_step(*parts) for step in (1, 2, 3, 4)}

    def save(checkpoints, step):
        """A save of ``step``'s weights."""
        with torch.no_grad():
            for name, p in parts[0].named_parameters():
                p.copy_(weights[step][name])
        _save(checkpoints, parts, step)

    def save_crashing(checkpoints, step, when) -> bool:
        """Whether the crash happened (``when`` past the save's last change: it finished)."""
        with monkeypatch.context() as patch:
            done = _crash_at(patch, when)
            try:
                save(checkpoints, step)
            except Crash:
                return True
        assert len(done) <= when
        return False

    into = _parts(tiny_model_dir)

    def resumed(checkpoints) -> int:
        step, restored = _resume(checkpoints, into)
        _assert_same(restored, weights[step])
        return step

    base = tmp_path / "base"
    save(base, 1)
    tried = 0
    for first in range(100):
        checkpoints = tmp_path / f"first-{first}"
        shutil.copytree(base, checkpoints)
        if not save_crashing(checkpoints, 2, first):
            break
        after_first = resumed(checkpoints)
        assert after_first in (1, 2)
        for second in range(100):
            again = tmp_path / f"second-{first}-{second}"
            shutil.copytree(checkpoints, again)
            crashed = save_crashing(again, 3, second)
            assert resumed(again) in ((after_first, 3) if crashed else (3,))
            save(again, 4)
            assert [p.name for p in again.iterdir()] == ["last"] and resumed(again) == 4
            shutil.rmtree(again)
            tried += 1
            if not crashed:
                break
    assert tried > 50, "a save makes fewer changes to the disk than this test expects: is it still watched?"


# Durable small files.

def test_write_atomic_fsyncs_the_file_before_its_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, Path.replace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(self, target):
        events.append(("replace", str(self)))
        return replace(self, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(Path, "replace", recording_replace)
    target = tmp_path / "status.json"
    write_atomic(target, '{"status": "running"}')
    tmp = str(tmp_path / f".status.json.{os.getpid()}.tmp")
    assert events == [("fsync", tmp), ("replace", tmp), ("fsync", str(tmp_path))]
    assert target.read_text() == '{"status": "running"}'


def test_write_atomic_that_cannot_reach_the_disk_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    write_atomic(target, "old")

    def io_error(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", io_error)
    with pytest.raises(OSError):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# The whole command.

def _interrupted_run(tmp_path, model_dir, data) -> Path:
    """A tiny ``tunesmith train`` (a checkpoint every 2 steps) stopped by Ctrl-C at step 3 of 6; returns
    its config file."""
    path = write_config(tmp_path / "c.yaml", model_dir, data,
                        train={"max_steps": 6, "save_every": 2, "eval_every": 100})

    def ctrl_c(state):
        if state.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(load_config(path), on_step=ctrl_c)
    return path


def test_train_resumes_from_the_checkpoint_a_crash_left_as_last_old(tmp_path, tiny_model_dir, review_data):
    config = _interrupted_run(tmp_path, tiny_model_dir, review_data)
    run = Run(tmp_path / "run")
    checkpoints = run.checkpoints
    (checkpoints / "last").rename(checkpoints / "last.old")
    saved_at = json.loads((checkpoints / "last.old" / "state.json").read_text())["step"]
    assert 0 < saved_at < 6

    taken = []
    run_training(load_config(config), resume=True, on_step=lambda state: taken.append(state.step))  # --resume
    assert taken == list(range(saved_at + 1, 7)), "the run did not go on from the checkpoint"
    assert run.status() == "complete"
    assert json.loads((run.path / "metrics.json").read_text())["steps"] == 6
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith("last")] == ["last"]  # tidied by a save


def test_train_resume_refuses_a_planted_optimizer_pt(tmp_path, tiny_model_dir, review_data, capsys):
    config = _interrupted_run(tmp_path, tiny_model_dir, review_data)
    marker = tmp_path / "payload-ran"
    planted = tmp_path / "run" / "checkpoints" / "last" / "optimizer.pt"
    torch.save({"optimizer": _Planted(marker), "scheduler": {}, "rng": []}, planted)
    cli_fails(capsys, ["train", str(config), "--resume"], str(planted), "not a plain checkpoint")
    assert not marker.exists(), "--resume ran the planted code"
