"""Runs that continue runs: a run's parent is recorded in its status (``Run.parent``) when it starts,
so the chain survives a child that crashes or is interrupted.

``chain`` and ``runs_table`` are what ``tunesmith runs show`` and ``tunesmith runs list`` print
(whether a run can be continued by a config is ``lifecycle.continual.check_parent``'s: it asks the
objectives). Reading runs needs no model.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.eval.metrics import METRICS
from tunesmith.store.run import Run


def chain(path: str | Path) -> list[Run]:
    """The run at ``path`` and its ancestors, oldest first (a missing ancestor ends the chain)."""
    runs, seen = [], set()
    current: Path | None = Path(path)
    while current is not None and current.resolve() not in seen:
        seen.add(current.resolve())
        run = Run(current, writer=False)
        runs.append(run)
        current = run.parent if (current / "status.json").is_file() else None
    return runs[::-1]


def describe(run: Run) -> dict:
    """What a table of runs shows: status, model, method, objective, parent, the reference (dpo, kto)
    and the tuned metrics."""
    record = run.record()
    if not record and not (run.path / "config.yaml").is_file():
        return {"run": str(run.path), "status": "missing"}
    metrics = run.load_json("metrics", {})
    try:
        config = run.load_config()
    except TunesmithError:  # no config.yaml, or one this version cannot read: the table still lists the run
        config = None
    return {
        "run": str(run.path),
        "status": record.get("status", "?"),
        "model": config.model.name if config else "?",
        "method": config.method.name if config else "?",
        "objective": config.objective.name if config else "?",
        "parent": record.get("parent"),
        "merged_from": record.get("merged_from", []),
        "reference": metrics.get("reference"),  # what a dpo or kto run trained against: base, or parent RUN
        "tuned": metrics.get("tuned", {}),
    }


def format_chain(path: str | Path) -> str:
    """``tunesmith runs show``: one block per run of the chain, oldest first."""
    lines = []
    runs = chain(path)
    for depth, run in enumerate(runs):
        d = describe(run)
        head = f"{'  ' * depth}{'└─ ' if depth else ''}{d['run']}  [{d['status']}]"
        lines.append(head)
        if d["status"] == "missing":
            continue
        indent = "  " * depth + ("   " if depth else "")
        lines.append(f"{indent}model {d['model']}, method {d['method']}, objective {d['objective']}"
                     + (f", reference {d['reference']}" if d["reference"] else ""))
        if d["merged_from"]:
            lines.append(f"{indent}merged from: " + ", ".join(d["merged_from"]))
        if d["tuned"]:
            lines.append(f"{indent}tuned: " + "  ".join(f"{k} {v:.4f}" for k, v in d["tuned"].items()))
    return "\n".join(lines)


KEY_METRICS = tuple(name for name, metric in METRICS.items() if metric.key)


def runs_table(root: str | Path) -> str:
    """``tunesmith runs list``: every run directory directly under ``root`` (or ``root`` itself)."""
    root = Path(root)
    if not root.is_dir():
        raise TunesmithError(f"{root}: no such directory")
    found = [p for p in sorted(root.iterdir()) if (p / "status.json").is_file()]
    if (root / "status.json").is_file():
        found.insert(0, root)
    if not found:
        return f"no runs in {root}"
    lines = ["| run | status | method | objective | " + " | ".join(KEY_METRICS) + " | parent |",
             "|---|---|---|---|" + "---:|" * len(KEY_METRICS) + "---|"]
    for path in found:
        d = describe(Run(path, writer=False))
        cells = [f"{d['tuned'][k]:.4f}" if k in d.get("tuned", {}) else "" for k in KEY_METRICS]
        parent = Path(d["parent"]).name if d.get("parent") else ""
        lines.append(f"| {path.name} | {d['status']} | {d.get('method', '?')} | {d.get('objective', '?')} | "
                     + " | ".join(cells) + f" | {parent} |")
    return "\n".join(lines)
