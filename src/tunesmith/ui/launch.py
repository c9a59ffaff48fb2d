"""The launch API (admin keys only: ``serve.access.ROUTES``): start ``tunesmith train``, ``search`` or
``retrain`` from a config and a list of field edits, stop a run, resume it.

A launch is checked here first with the command's own loader (``config.load_config``,
``search.study.load_plan``, ``Run.check_new``), so the launch page shows exactly the lines the CLI
would print, each beside the edit it is about, and nothing starts. Then the command itself runs as
a child process in its own session, its output in the run's ``launch.log``: the run is the CLI's
run, and it outlives the page. Stop is SIGTERM, which training turns into a checkpoint and the
status ``interrupted``; resume is ``tunesmith train RUN/config.yaml --resume``.

Stop signals a process it did not start (a run launched before the server restarted, or from a
terminal) only when ``status.json`` names a live process of this host that runs the command line
the run recorded (``/proc/PID/cmdline``): never pid 0 or below, 1, or the server's own, and never a
process that took over the pid of a run that died. Every run's directory is under ``--dir``: its
name is its path there, and an edit of ``output.dir`` elsewhere is refused.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Literal

import yaml
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.serve.errors import ApiError
from tunesmith.store import Run
from tunesmith.store.run import process_cmdline
from tunesmith.ui.runs import find_runs, run_path, summary

router = APIRouter(prefix="/ui/api/launch")
RUN_SOURCE = "run:"  # a source naming a run's config.yaml rather than an example file


class Launch(BaseModel):
    command: Literal["train", "search", "retrain"] = "train"
    source: str = Field(min_length=1, description="an example's file name, or run:NAME (its config.yaml)")
    name: str = Field(min_length=1, description="the new run's directory under the runs directory")
    edits: list[str] = Field(default_factory=list, description="PATH = VALUE, as the CLI's --set PATH=VALUE")
    trials: int = Field(2, ge=1, description="search: the trials the study ends with")


class RunName(BaseModel):
    name: str = Field(min_length=1)


@router.get("/sources")
def sources(request: Request):
    """What a launch can start from: the example configs, and every run's saved config."""
    ctx = request.app.state.ui
    examples = sorted(ctx.examples_dir.glob("*.yaml")) if ctx.examples_dir.is_dir() else []
    runs = [p for p in find_runs(ctx.runs_dir) if (p / "config.yaml").is_file()]
    return {"examples": [p.name for p in examples],
            "runs": [str(p.relative_to(ctx.runs_dir)) for p in runs]}


@router.get("/source")
def source(request: Request, source: str):
    """A source's YAML and the dotted paths of its fields (what edits can name), with their values."""
    path = source_path(request.app.state.ui, source)
    text = path.read_text()
    return {"path": str(path), "text": text, "fields": dict(flatten(yaml.safe_load(text) or {}))}


@router.post("")
def launch(body: Launch, request: Request):
    ctx = request.app.state.ui
    edits = [normalise(e) for e in body.edits if e.strip()]
    if not valid_name(body.name):
        why = "a run name is letters, digits, '.', '_' and '-' (and '/' for a folder)"
        return refused([("name", f"name {body.name!r}: {why}")], edits)
    unreadable = [(i, problem) for i, edit in enumerate(edits) if (problem := unreadable_value(edit))]
    if unreadable:
        return refused(unreadable, edits)
    run_dir = run_path(ctx, body.name)
    try:
        argv = check(ctx, body, edits, run_dir)
    except TunesmithError as err:
        return refused([(None, p) for p in err.problems], edits)
    return start(ctx, body.name, run_dir, argv)


@router.post("/stop")
def stop(body: RunName, request: Request):
    """SIGTERM to the run's process: training stops at a step boundary with a checkpoint."""
    ctx = request.app.state.ui
    path = run_path(ctx, body.name)
    process = ctx.processes.get(body.name)
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        return {"name": body.name, "pid": process.pid, "signal": "SIGTERM"}
    record = Run(path, writer=False).record()
    if record.get("status") != "running":
        raise ApiError(400, f"run {body.name!r} is not running (status: {record.get('status', 'none')})", "name")
    try:
        pid = run_process(record)
    except TunesmithError as err:
        raise ApiError(400, f"run {body.name!r}: {err}; nothing was signalled", "name") from None
    os.kill(pid, signal.SIGTERM)
    return {"name": body.name, "pid": pid, "signal": "SIGTERM"}


def run_process(record: dict) -> int:
    """The pid of the live process that ``record`` (a ``running`` status.json) names, after checking
    that it is the run's: on this host, not a pid that signals a group or init, not this server, alive,
    and running the command line the run recorded when it started (a pid reused since fails that)."""
    pid, host = record.get("pid"), record.get("host")
    if host != socket.gethostname():
        raise TunesmithError(f"it runs on {host}, not on this machine")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        raise TunesmithError(f"status.json names pid {pid!r}, which is no run's process")
    if pid == os.getpid():
        raise TunesmithError(f"status.json names pid {pid}, this server's own process")
    recorded = record.get("cmdline")
    if not recorded:
        raise TunesmithError("status.json records no command line (a run of an older tunesmith), so its process "
                             f"cannot be told from another that took pid {pid}; stop it where it runs")
    found = process_cmdline(pid)
    if found is None:
        raise TunesmithError(f"process {pid} is gone")
    if found != recorded:
        raise TunesmithError(f"process {pid} runs {shlex.join(found)!r}, not the run's {shlex.join(recorded)!r} "
                             "(its pid was reused)")
    return pid


@router.post("/resume")
def resume(body: RunName, request: Request):
    """``tunesmith train RUN/config.yaml --resume``, refused as the CLI refuses it."""
    ctx = request.app.state.ui
    path = run_path(ctx, body.name)
    run = Run(path, writer=False)
    try:
        run.check_new(resume=True)
        config = path / "config.yaml"
        load_config(config)
    except TunesmithError as err:
        raise ApiError(400, "; ".join(err.problems), "name") from None
    return start(ctx, body.name, path, ["train", str(config), "--resume"])


def check(ctx, body: Launch, edits: list[str], run_dir: Path) -> list[str]:
    """The command's arguments, after the checks the command itself makes before it starts."""
    check_output(ctx, edits, run_dir)
    sets = [arg for edit in edits for arg in ("--set", edit)]
    if body.command == "retrain":
        parent = source_run(ctx, body.source)
        load_config(parent / "config.yaml", edits)
        Run(run_dir, writer=False).check_new(resume=False)
        return ["retrain", str(parent), "--out", str(run_dir), "--store", str(ctx.store_path),
                "--log", str(ctx.runs_dir / "retrain_decisions.jsonl"), *sets]
    path = source_path(ctx, body.source)
    sets += ["--set", f"output.dir={run_dir}"]
    overrides = [*edits, f"output.dir={run_dir}"]
    if body.command == "search":
        from tunesmith.search.study import load_plan

        load_plan(str(path), overrides)
        return ["search", str(path), "--trials", str(body.trials), *sets]
    load_config(path, overrides)
    Run(run_dir, writer=False).check_new(resume=False)
    return ["train", str(path), *sets]


def check_output(ctx, edits: list[str], run_dir: Path) -> None:
    """A run's directory is its name under ``--dir``: an edit of ``output.dir`` that puts it anywhere
    else, or of the whole ``output`` section, is refused, at that edit."""
    root, problems = ctx.runs_dir.resolve(), []
    for edit in edits:
        key, _, value = edit.partition("=")
        if key == "output":
            problems.append(f"--set {edit!r}: edit output's fields one by one (output.FIELD = VALUE); "
                            f"a run's directory is its name under {ctx.runs_dir}")
        elif key == "output.dir":
            target = Path(str(yaml.safe_load(value))).resolve()
            if target != run_dir.resolve():
                where = "outside the runs directory" if not target.is_relative_to(root) else "another run's directory"
                problems.append(f"--set {edit!r}: {target} is {where}; a run's directory is its name under "
                                f"{ctx.runs_dir} ({run_dir}): change the name instead")
    if problems:
        raise TunesmithError(*problems)


def start(ctx, name: str, run_dir: Path, args: list[str]) -> dict:
    """Run ``tunesmith ARGS`` in its own session, its output appended to the run's launch.log."""
    running = ctx.processes.get(name)
    if running is not None and running.poll() is None:
        raise ApiError(400, f"run {name!r} is already being run by this server (pid {running.pid})", "name")
    run = Run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    command = "tunesmith " + shlex.join(args)
    with run.launch_log.open("ab") as log:
        log.write(f"$ {command}\n".encode())
        log.flush()
        # The child gets its own session: a Ctrl-C meant for the server does not stop training.
        process = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", *args], stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ctx.processes[name] = process
    return {"name": name, "pid": process.pid, "command": command, "run": summary(ctx, run_dir)}


def refused(problems: list[tuple[str | None, str]], edits: list[str]) -> JSONResponse:
    """400 with every problem, each placed at the edit it names (``field``: its index) where it names one."""
    placed = [{"field": field if field is not None else edit_of(message, edits), "message": message}
              for field, message in problems]
    message = "\n".join(p["message"] for p in placed)
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": 400,
                                   "problems": placed}}, 400)


def edit_of(message: str, edits: list[str]) -> int | str | None:
    """The index of the edit a CLI message is about (``--set 'EDIT'`` or ``: PATH:``), ``"name"`` for
    the output directory, or None for the config as a whole."""
    for i, edit in enumerate(edits):
        key = edit.partition("=")[0]
        if f"--set {edit!r}" in message or f": {key}:" in message or f": {key}." in message:
            return i
    return "name" if "output.dir" in message else None


def unreadable_value(edit: str) -> str | None:
    """Why an edit's value is no YAML value (``[unclosed``, a NUL byte), or None: the config loader
    reads each value as YAML and would fail on it with a parser's traceback, not a line for the page."""
    value = edit.partition("=")[2]
    try:
        yaml.safe_load(value)
    except yaml.YAMLError as err:
        why = str(getattr(err, "problem", None) or err).splitlines()[0]
        return f"--set {edit!r}: the value is not YAML ({why})"
    return None


def normalise(edit: str) -> str:
    """``PATH = VALUE`` (as the page shows it) as the CLI's ``PATH=VALUE``."""
    key, sep, value = edit.partition("=")
    return f"{key.strip()}{sep}{value.strip()}" if sep else edit.strip()


def valid_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", name)) and ".." not in name.split("/")


def source_path(ctx, source: str) -> Path:
    """The config file a source names: an example in the examples directory, or a run's config.yaml."""
    if source.startswith(RUN_SOURCE):
        return source_run(ctx, source) / "config.yaml"
    path = ctx.examples_dir / source
    if "/" in source or not path.is_file():
        raise ApiError(404, f"no example config {source!r} in {ctx.examples_dir}", "source")
    return path


def source_run(ctx, source: str) -> Path:
    path = run_path(ctx, source.removeprefix(RUN_SOURCE))
    if not (path / "config.yaml").is_file():
        raise ApiError(404, f"no run {source.removeprefix(RUN_SOURCE)!r} with a config under {ctx.runs_dir}",
                       "source")
    return path


def flatten(section: dict, prefix: str = ""):
    """``(dotted path, value)`` for every leaf of a config mapping."""
    for key, value in section.items():
        if isinstance(value, dict) and value:
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
