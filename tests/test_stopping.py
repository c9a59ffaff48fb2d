"""SIGTERM stops a run within seconds at every phase, leaves it ``interrupted``, and ``--resume`` goes on."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import write_config
from tunesmith.cli import EXIT_TERMINATED, main
from tunesmith.stopping import Interrupted, StopRequest, UpdateHold, on_sigterm
from tunesmith.store import Run

# Runs `tunesmith train CONFIG` with one phase made long: the phase announces itself, then repeats
# its real work until it is stopped. The base and the tuned evaluation are the first and second
# calls of Session._held_out, which score and score_report both take their rows from.
SLOW_PHASE = """
import sys, time
from tunesmith import session
from tunesmith.cli import main

phase, calls = sys.argv[2], []
real = getattr(session.Session, "prepare" if phase == "prepare" else "_held_out")

def slow(self, *args, **kwargs):
    calls.append(1)
    if phase == "prepare" or len(calls) == (1 if phase == "base" else 2):
        print("SLOW PHASE", flush=True)
        end = time.monotonic() + 300
        while time.monotonic() < end:
            real(self, *args, **kwargs)
    return real(self, *args, **kwargs)

setattr(session.Session, "prepare" if phase == "prepare" else "_held_out", slow)
sys.exit(main(["train", sys.argv[1]]))
"""


def _stop_during(phase: str, config) -> tuple[float, str]:
    """Start the run, SIGTERM it once ``phase`` has begun; the seconds it took to exit, and its stderr."""
    child = subprocess.Popen([sys.executable, "-c", SLOW_PHASE, str(config), phase],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120  # a bound on waiting for a hung child, not a figure under test
    for line in child.stdout:
        if "SLOW PHASE" in line or time.monotonic() > deadline:
            break
    time.sleep(0.5)  # well inside the phase
    child.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    try:
        _, err = child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        pytest.fail(f"SIGTERM during {phase} was not honoured within 60 s")
    assert child.returncode == EXIT_TERMINATED, err[-3000:]
    return time.monotonic() - sent, err


def _config(tmp_path, tiny_model_dir, review_data, name: str):
    return write_config(tmp_path / f"{name}.yaml", tiny_model_dir, review_data, output={"dir": str(tmp_path / name)},
                        train={"max_steps": 6, "save_every": 100, "eval_every": 3})


def _steps(run: Run) -> list[int]:
    return [r["step"] for r in map(json.loads, run.metrics_log.read_text().splitlines()) if "loss" in r]


def test_sigterm_during_the_base_evaluation_stops_within_seconds_and_resume_starts_cleanly(
        tmp_path, tiny_model_dir, review_data):
    config = _config(tmp_path, tiny_model_dir, review_data, "base")
    seconds, err = _stop_during("base", config)
    assert seconds < 10, f"SIGTERM during the base evaluation took {seconds:.1f} s"
    assert "stopped before the first checkpoint" in err and "--resume" in err
    run = Run(tmp_path / "base")
    assert run.status() == "interrupted" and not run.has_checkpoint()
    assert not run.metrics_log.exists() and not (run.path / "metrics.json").exists()

    assert main(["train", str(config), "--resume"]) == 0
    assert run.status() == "complete" and _steps(run) == [1, 2, 3, 4, 5, 6]


def test_sigterm_during_the_tuned_evaluation_resumes_without_training_again(tmp_path, tiny_model_dir, review_data):
    config = _config(tmp_path, tiny_model_dir, review_data, "tuned")
    seconds, err = _stop_during("tuned", config)
    assert seconds < 10, f"SIGTERM during the tuned evaluation took {seconds:.1f} s"
    run = Run(tmp_path / "tuned")
    assert run.status() == "interrupted" and run.has_checkpoint() and not run.report.exists()
    assert "checkpoint saved" in err

    assert main(["train", str(config), "--resume"]) == 0
    assert run.status() == "complete" and _steps(run) == [1, 2, 3, 4, 5, 6]  # no step taken twice


def test_sigterm_during_data_preparation_writes_nothing(tmp_path, tiny_model_dir, review_data):
    config = _config(tmp_path, tiny_model_dir, review_data, "prepare")
    seconds, err = _stop_during("prepare", config)
    assert seconds < 10, f"SIGTERM during data preparation took {seconds:.1f} s"
    assert "stopped before the run started" in err
    assert not (tmp_path / "prepare").exists()


def test_a_stop_requested_during_an_update_waits_for_the_step_to_be_counted():
    import torch

    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    with on_sigterm() as stop:
        hold = UpdateHold(stop, optimizer)
        try:
            param.grad = torch.ones(2)
            optimizer.step()  # the update has begun: a SIGTERM now must not cut the step in half
            signal.raise_signal(signal.SIGTERM)
            assert stop.is_set()
            with pytest.raises(Interrupted):
                hold.end()  # the step's boundary
            hold.end()  # a second boundary raises nothing more
        finally:
            hold.remove()
    assert signal.getsignal(signal.SIGTERM) is not stop._on_signal  # the handler is gone with the block


def test_sigterm_raises_at_once_outside_a_hold_and_only_once():
    request = StopRequest()
    with pytest.raises(Interrupted):
        request._on_signal(signal.SIGTERM, None)
    request._on_signal(signal.SIGTERM, None)  # while the first one's checkpoint is written: no second raise
    assert request.is_set()
