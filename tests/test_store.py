"""The run store: a run's state is what it says, and SIGTERM stops training as Ctrl-C does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_config
from tunesmith.cli import EXIT_TERMINATED, main
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.files import write_atomic
from tunesmith.recipe import run_training
from tunesmith.store import Run


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_status_records_the_process_and_reads_crashed_when_it_is_gone(tmp_path):
    run = Run(tmp_path / "r")
    run.set_status("running")
    record = run.record()
    assert record["status"] == "running" and record["pid"] == os.getpid()
    assert record["started_at"] and record["updated_at"] and record["host"]
    started = record["started_at"]

    (run.path / "status.json").write_text(json.dumps({**record, "pid": _dead_pid()}))
    assert run.status() == "crashed"
    run.check_new(resume=True)  # no checkpoint yet: --resume starts its training from the beginning
    with pytest.raises(TunesmithError, match="no run there to resume"):
        Run(tmp_path / "never-started").check_new(resume=True)

    run.set_status("running")  # a resumed run keeps its start time
    assert run.status() == "running" and run.record()["started_at"] == started
    with pytest.raises(TunesmithError, match="still running"):
        run.check_new(resume=True)
    run.set_status("complete")
    assert run.status() == "complete" and run.parent is None


def test_a_killed_child_not_yet_reaped_reads_crashed(tmp_path):
    # A search worker killed while its parent waits on another worker stays a zombie until reaped;
    # its trial's run must read as crashed, so that the retry resumes it.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    run = Run(tmp_path / "r")
    run.set_status("running")
    (run.path / "status.json").write_text(json.dumps({**run.record(), "pid": child.pid}))
    assert run.status() == "running"
    child.kill()
    deadline = time.monotonic() + 10
    while run.status() == "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert run.status() == "crashed" and child.returncode is None  # crashed before the wait() reaps it
    child.wait()


def test_a_run_remembers_its_parent(tmp_path):
    run = Run(tmp_path / "child")
    run.set_status("running", parent=str(tmp_path / "parent"))
    run.set_status("complete")
    assert run.parent == tmp_path / "parent"


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "status.json"
    write_atomic(target, "old")

    def full_disk(self, other):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", full_disk)
    with pytest.raises(OSError):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_a_reader_never_writes(tmp_path):
    reader = Run(tmp_path / "r", writer=False)
    reader.set_status("running")
    reader.save_json("labels", ["a"])
    assert not (tmp_path / "r").exists()


def test_sigterm_checkpoints_and_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, tiny_model_dir,
                                                                               review_data):
    steps = 150

    def config_file(name):
        return write_config(tmp_path / f"{name}.yaml", tiny_model_dir, review_data,
                            output={"dir": str(tmp_path / name)}, method={"dropout": 0.1},
                            train={"max_steps": steps, "save_every": 1000, "eval_every": 1000, "threads": 1})

    straight = config_file("straight")
    run_training(load_config(straight))

    stopped = config_file("stopped")
    log = tmp_path / "stopped" / "metrics.jsonl"
    child = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "train", str(stopped)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def going() -> bool:
        return log.is_file() and log.read_text().count('"loss"') >= 3

    deadline = time.monotonic() + 120  # a bound on waiting for a hung child, not a figure under test
    while not going() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert going(), "training never got going"
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)
    assert child.returncode == EXIT_TERMINATED, err[-2000:]
    assert f"tunesmith train {stopped} --resume" in err
    run = Run(tmp_path / "stopped")
    assert run.status() == "interrupted" and run.has_checkpoint()
    assert not (tmp_path / "stopped" / "metrics.json").exists()
    done_steps = json.loads((run.checkpoints / "last" / "state.json").read_text())["step"]
    assert 3 <= done_steps < steps, "SIGTERM must stop training before its end"

    assert main(["train", str(stopped), "--resume"]) == 0
    assert run.status() == "complete"
    expected = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0, msg=name)
