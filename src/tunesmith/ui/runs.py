"""The runs API: every run under the UI's runs directory, one run's contents, its metrics as they
grow, and several runs' metrics side by side. Runs are read through ``store.Run`` and
``store.lineage.describe``, as ``tunesmith runs list`` reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from fastapi import APIRouter, Request

from tunesmith.compare import COLUMNS, fmt_cell, run_row
from tunesmith.eval.metrics import METRICS
from tunesmith.serve.access import Caller
from tunesmith.serve.errors import ApiError
from tunesmith.store import Run
from tunesmith.store.lineage import KEY_METRICS, describe
from tunesmith.store.run import UNFINISHED

router = APIRouter(prefix="/ui/api")
LOG_TAIL_BYTES = 8000
MAX_COMPARED = 16  # each run compared is read whole (its metrics.jsonl too): a request must not read every run


def find_runs(root: Path, depth: int = 2) -> list[Path]:
    """Run directories under ``root``: its children, and theirs (compare's and search's runs)."""
    found = []
    for path in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if (path / "status.json").is_file() or (path / "config.yaml").is_file():
            found.append(path)
        if depth > 1:
            found += find_runs(path, depth - 1)
    return found


def run_path(ctx, name: str) -> Path:
    """The directory of run ``name`` (relative to the runs directory), never one outside it."""
    root = ctx.runs_dir.resolve()
    missing = ApiError(404, f"no run {name!r} under {ctx.runs_dir}", "name")
    try:
        path = (root / name).resolve()
        path.exists()  # a name no file system can hold (a NUL byte, over 255 bytes) fails here, not later
    except (ValueError, OSError):
        raise missing from None
    if not name or not path.is_relative_to(root) or path == root:
        raise missing
    return path


def summary(ctx, path: Path) -> dict:
    """One row of the runs table: ``describe`` plus the run's name, times and its launch process."""
    root = ctx.runs_dir.resolve()
    name = str(path.resolve().relative_to(root))
    process = ctx.processes.get(name)
    # Polled first: that reaps a child that has ended, which would otherwise still read as alive.
    code = process.poll() if process is not None else None
    row = describe(Run(path, writer=False)) | {"name": name}
    record = Run(path, writer=False).record()
    row |= {key: record.get(key) for key in ("started_at", "updated_at", "error")}
    if row.get("parent"):
        parent = Path(row["parent"]).resolve()
        row["parent_name"] = str(parent.relative_to(root)) if parent.is_relative_to(root) else str(parent)
    if process is not None:
        row["process"] = {"pid": process.pid, "exit_code": code}
        if row["status"] == "missing":  # launched, and not (yet) a run: starting, or a search's folder
            row["status"] = "starting" if code is None else "complete" if code == 0 else "failed"
    return row


@router.get("/whoami")
def whoami(caller: Caller):
    return {"role": caller.role, "key_id": caller.key_id}


@router.get("/runs")
def list_runs(request: Request):
    ctx = request.app.state.ui
    paths = [p.resolve() for p in find_runs(ctx.runs_dir)]
    for name in ctx.processes:  # launched runs that have not written anything yet
        path = run_path(ctx, name)
        if path not in paths:
            paths.append(path)
    return {"runs_dir": str(ctx.runs_dir), "key_metrics": list(KEY_METRICS),
            "metrics": {name: {"label": m.label, "higher_is_better": m.higher_is_better} for name, m in METRICS.items()},
            "runs": [summary(ctx, path) for path in paths]}


@router.get("/run")
def show_run(request: Request, name: str):
    ctx = request.app.state.ui
    path = run_path(ctx, name)
    if not path.is_dir() and name not in ctx.processes:
        raise ApiError(404, f"no run {name!r} under {ctx.runs_dir}", "name")
    run = Run(path, writer=False)
    config_text = (path / "config.yaml").read_text() if (path / "config.yaml").is_file() else ""
    return summary(ctx, path) | {
        "path": str(path),
        "record": run.record(),
        "config": yaml.safe_load(config_text) if config_text else None,
        "config_text": config_text,
        "data_stats": run.load_json("data_stats"),
        "base_eval": run.load_json("base_eval"),
        "metrics": run.load_json("metrics"),
        "report": run.report.read_text() if run.report.is_file() else None,
        "labels": run.labels(),
        # A child of ``tunesmith retrain``: the gate's decision and its figures.
        "retrain_decision": run.load_json("retrain_decision"),
        "resumable": run.status() in UNFINISHED and run.has_checkpoint(),
        "log": log_tail(run),
    }


@router.get("/run/metrics")
def run_metrics(request: Request, name: str, after: int = 0):
    """The records of metrics.jsonl from line ``after`` on, and the run's status: a page polls this."""
    ctx = request.app.state.ui
    run = Run(run_path(ctx, name), writer=False)
    records, upto = read_records(run.metrics_log, after)
    return {"records": records, "next": upto, "status": summary(ctx, run.path)["status"]}


@router.get("/compare")
def compare_runs(request: Request, names: str):
    """Several runs side by side: ``tunesmith compare``'s table, their metrics.json and loss curves."""
    ctx = request.app.state.ui
    chosen = list(dict.fromkeys(n for n in names.split(",") if n))
    if not chosen:
        raise ApiError(400, "choose at least one run", "names")
    if len(chosen) > MAX_COMPARED:
        raise ApiError(400, f"names: at most {MAX_COMPARED} runs side by side, got {len(chosen)}", "names")
    rows = []
    for name in chosen:
        run = Run(run_path(ctx, name), writer=False)
        rows.append(summary(ctx, run.path) | {"metrics": run.load_json("metrics", {}), "table": compare_row(run),
                                               "curve": read_records(run.metrics_log, 0)[0]})
    return {"columns": [title for _, title, _ in COLUMNS], "runs": rows}


def compare_row(run: Run) -> dict | None:
    """A finished run's cells of ``tunesmith compare``'s table (title -> text), or None."""
    if run.load_json("metrics") is None:
        return None
    config = run.load_config()
    try:
        row = run_row(config.method.name, run.path, config.train.lr)
    except KeyError:  # a summary without the fields compare reads (an objective with other metrics)
        return None
    return {title: fmt_cell(row[key], spec) for key, title, spec in COLUMNS}


def read_records(path: Path, after: int) -> tuple[list[dict], int]:
    """metrics.jsonl's records from line ``after``, and the line to read from next time; a last line
    still being written is left for next time."""
    if not path.is_file():
        return [], after
    whole = path.read_text().split("\n")[after:-1]  # the text after the last newline is not a record yet
    return [json.loads(line) for line in whole if line.strip()], after + len(whole)


def log_tail(run: Run) -> str | None:
    """The end of the run's launch log (written when the UI started it)."""
    path = run.launch_log
    if not path.is_file():
        return None
    with path.open("rb") as f:
        f.seek(max(path.stat().st_size - LOG_TAIL_BYTES, 0))
        return f.read().decode(errors="replace")
