"""The launch API's process safety (``ui/launch.py``), without a server: Stop signals a process it did
not start only when status.json names a live process of this host running the run's own command
line, and a launch never puts a run's directory outside the runs directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
from conftest import review_rows, write_config, write_jsonl

from tunesmith.serve.errors import ApiError
from tunesmith.store.run import process_cmdline
from tunesmith.ui import launch
from tunesmith.ui.app import UiContext

HOST = socket.gethostname()
A_RUNS_COMMAND = [sys.executable, "-m", "tunesmith.cli", "train", "runs/x/config.yaml"]


@pytest.fixture
def ui(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    ctx = UiContext(runs_dir=runs, store_path=runs / "store.sqlite", examples_dir=tmp_path / "examples")
    return SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(ui=ctx)))


@pytest.fixture
def signals(monkeypatch):
    """``os.kill`` for the test: signal 0 (is it alive?) goes through; any other is recorded, not sent."""
    sent, real = [], os.kill

    def kill(pid, sig):
        if sig == 0:
            return real(pid, 0)
        sent.append((pid, sig))

    monkeypatch.setattr(os, "kill", kill)
    return sent


def running(ui, name: str, **record) -> None:
    path = ui.app.state.ui.runs_dir / name
    path.mkdir()
    (path / "status.json").write_text(json.dumps({"status": "running", "host": HOST, **record}))


def stop(ui, name: str):
    return launch.stop(launch.RunName(name=name), ui)


@pytest.fixture
def sleeper():
    """A process that is not a run: `sleep`, once it has replaced the forked Python (Popen can return
    a moment before /proc shows the new command line)."""
    process = subprocess.Popen(["sleep", "60"])
    deadline = time.monotonic() + 10
    while process_cmdline(process.pid) != ["sleep", "60"] and time.monotonic() < deadline:
        time.sleep(0.01)
    yield process
    process.kill()
    process.wait()


@pytest.mark.parametrize("pid,why", [
    (0, "pid 0, which is no run's process"),  # os.kill(0, ...) signals this server's whole process group
    (-1, "pid -1, which is no run's process"),  # ... and -1 every process the server's user owns
    (1, "pid 1, which is no run's process"),
    (True, "pid True, which is no run's process"),
    ("12", "pid '12', which is no run's process"),
])
def test_stop_refuses_a_pid_that_is_no_runs_process(ui, signals, pid, why):
    running(ui, "r", pid=pid, cmdline=A_RUNS_COMMAND)
    with pytest.raises(ApiError, match=why) as err:
        stop(ui, "r")
    assert (err.value.status, err.value.param) == (400, "name") and "nothing was signalled" in err.value.message
    assert signals == []


def test_stop_refuses_the_servers_own_pid_another_host_and_a_reused_pid(ui, sleeper, signals):
    running(ui, "own", pid=os.getpid(), cmdline=A_RUNS_COMMAND)
    with pytest.raises(ApiError, match="this server's own process"):
        stop(ui, "own")
    running(ui, "away", pid=sleeper.pid, host="elsewhere", cmdline=A_RUNS_COMMAND)
    with pytest.raises(ApiError, match="runs on elsewhere, not on this machine"):
        stop(ui, "away")
    # The run died without saying so, and `sleep` took its pid.
    running(ui, "reused", pid=sleeper.pid, cmdline=A_RUNS_COMMAND)
    with pytest.raises(ApiError, match=f"process {sleeper.pid} runs 'sleep 60', not the run's .*pid was reused"):
        stop(ui, "reused")
    running(ui, "old", pid=sleeper.pid)  # a status.json of an older tunesmith: no command line to check
    with pytest.raises(ApiError, match="records no command line"):
        stop(ui, "old")
    assert signals == [] and sleeper.poll() is None


def test_stop_signals_the_process_that_runs_the_recorded_command(ui):
    # A stand-in for a run started elsewhere: it records its status as a run does, then waits.
    path = ui.app.state.ui.runs_dir / "elsewhere"
    script = textwrap.dedent(f"""
        import time
        from tunesmith.store import Run
        Run({str(path)!r}).set_status("running")
        print("ready", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert child.stdout.readline().strip() == "ready"
        record = json.loads((path / "status.json").read_text())
        assert (record["pid"], record["cmdline"][:2]) == (child.pid, [sys.executable, "-c"])
        assert stop(ui, "elsewhere") == {"name": "elsewhere", "pid": child.pid, "signal": "SIGTERM"}
        assert child.wait(30) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()


@pytest.fixture
def parent_run(ui, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "reviews.jsonl", review_rows(20))
    runs = ui.app.state.ui.runs_dir
    section = {"path": str(data), "format": "classification", "columns": {"text": "review", "label": "sentiment"}}
    (runs / "parent").mkdir()
    write_config(runs / "parent" / "config.yaml", tiny_model_dir, section, output={"dir": str(runs / "parent")})
    return runs / "parent"


@pytest.mark.parametrize("command", ["retrain", "train"])
def test_a_launch_cannot_move_the_run_out_of_the_runs_directory(ui, parent_run, tmp_path, monkeypatch, command):
    started = []
    monkeypatch.setattr(launch, "start", lambda *args: started.append(args))
    outside, beside = tmp_path / "outside", ui.app.state.ui.runs_dir / "other"
    edits = ["train.lr = 0.01", f"output.dir = {outside}", f"output.dir={beside}", f"output = {{dir: {outside}}}"]
    body = launch.Launch(command=command, source="run:parent", name="child", edits=edits)
    if command == "train":
        body = body.model_copy(update={"source": "example.yaml"})
        ui.app.state.ui.examples_dir.mkdir()
        (ui.app.state.ui.examples_dir / "example.yaml").write_text((parent_run / "config.yaml").read_text())
    refused = launch.launch(body, ui)
    assert refused.status_code == 400 and started == []
    problems = json.loads(refused.body)["error"]["problems"]
    assert [p["field"] for p in problems] == [1, 2, 3]
    assert "outside the runs directory" in problems[0]["message"]
    assert "another run's directory" in problems[1]["message"]
    assert "edit output's fields one by one" in problems[2]["message"]
    child = ui.app.state.ui.runs_dir / "child"
    launch.launch(body.model_copy(update={"edits": ["train.lr = 0.01", f"output.dir = {child}"]}), ui)
    ((_, name, run_dir, argv),) = started
    assert (name, run_dir) == ("child", child.resolve())
    if command == "retrain":
        assert argv[argv.index("--out") + 1] == str(child.resolve())
        assert argv[argv.index("--log") + 1] == str(ui.app.state.ui.runs_dir / "retrain_decisions.jsonl")
    assert not outside.exists() and not beside.exists()
