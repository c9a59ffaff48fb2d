"""``tunesmith compare``: train several methods on the same splits and tabulate cost against quality.

Each method runs as its own ``tunesmith train OUT/<method>.yaml`` process (the resolved config,
written by compare), so that peak memory is that method's alone, into ``OUT/<method>/``. The
config's method options go to every compared method that takes them (``r`` to lora and qlora,
``num_virtual_tokens`` to prompt learning, none to full). The table is written as ``OUT/compare.md`` and ``OUT/compare.csv``.
An override ``--set METHOD:KEY=VALUE`` applies to that method's run only (methods differ in the
learning rate they need: ``--set full:train.lr=5e-5 --set prompt:train.lr=3e-2``).
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from tunesmith.config import apply_overrides, load_config, read_config_file, save_config, with_method
from tunesmith.errors import TunesmithError
from tunesmith.eval.baselines import summary_line
from tunesmith.methods import REGISTRY
from tunesmith.store import Run

COLUMNS = [  # (key, title, markdown format)
    ("method", "method", "{}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("trainable_share", "trainable %", "{:.3g}"),
    ("lr", "learning rate", "{}"),
    ("stored_mb", "stored per task (MB)", "{:,.3g}"),
    ("peak_memory_mb", "peak memory (MB)", "{:,.0f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("train_seconds", "wall time (s)", "{:,.0f}"),
    ("val_loss", "validation loss", "{:.4f}"),
    ("test_metric", "test metric", "{}"),
    # A classifier's figures (eval.classification), blank for other runs.
    ("macro_f1", "macro-F1", "{:.4f}"),
    ("roc_auc", "ROC-AUC", "{:.4f}"),
    ("pr_auc", "PR-AUC", "{:.4f}"),
    ("ece", "ECE", "{:.4f}"),
]


def run_row(method: str, run: Path, lr: float) -> dict:
    """A finished run's row of the table (``COLUMNS``): cost and quality, from its metrics.json."""
    summary = Run(run).load_json("metrics")
    stored = Run(run).saved(REGISTRY[method])
    # The tokenizer is saved beside the weights for convenience; it is not what a task must store.
    weights = sum(f.stat().st_size for f in stored.iterdir() if f.suffix in (".safetensors", ".bin", ".json")
                  and not f.name.startswith(("tokenizer", "special_tokens", "chat_template")))
    tuned = summary["tuned"]
    metric = "accuracy" if "accuracy" in tuned else "perplexity"
    return {
        "method": method,
        "trainable_params": summary["trainable_params"],
        "trainable_share": 100 * summary["trainable_params"] / summary["total_params"],
        "lr": f"{lr:g}",
        "stored_mb": weights / 2**20,
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "tokens_per_s": summary["tokens_per_s"],
        "train_seconds": summary["train_seconds"],
        "val_loss": summary.get("best_val_loss"),
        "test_metric": f"{metric} {tuned[metric]:.4f}",
        "macro_f1": tuned.get("macro_f1"),
        **{key: summary.get("classification", {}).get(key) for key in ("roc_auc", "pr_auc", "ece")},
    }


def fmt_cell(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def write_tables(rows: list[dict], out: Path, found: dict | None = None) -> tuple[Path, Path]:
    """compare.md and compare.csv; ``found``: the baselines of the runs' shared splits (metrics.json's
    ``baselines``), in a line under the table."""
    md = out / "compare.md"
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "---|" + "---:|" * (len(COLUMNS) - 2) + "---|"]
    lines += ["| " + " | ".join(fmt_cell(r[key], spec) for key, _, spec in COLUMNS) + " |" for r in rows]
    if found:
        lines += ["", f"Baselines on the same splits: {summary_line(found)}."]
    md.write_text("\n".join(lines) + "\n")
    path = out / "compare.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[key for key, _, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    return md, path


def _method_of(item: str) -> str | None:
    """The METHOD of an override ``METHOD:KEY=VALUE``; None for a shared ``KEY=VALUE``."""
    key = item.split("=", 1)[0]
    return key.split(":", 1)[0] if ":" in key else None


def method_overrides(method: str, overrides: list[str]) -> list[str]:
    """The overrides for ``method``'s run: the shared ones, then its own (``METHOD:KEY=VALUE``)."""
    shared = [item for item in overrides if _method_of(item) is None]
    own = [item.split(":", 1)[1] for item in overrides if _method_of(item) == method]
    return [*shared, *own]


def compare(config_path: str, methods: list[str], overrides: list[str], out: Path) -> Path:
    """Train every method (each in a child process) and write the comparison tables."""
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise TunesmithError(f"--methods: unknown method(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    stray = [item for item in overrides if _method_of(item) not in (None, *methods)]
    if stray:
        raise TunesmithError(*(f"--set {item}: {_method_of(item)!r} is not one of --methods "
                               f"({', '.join(methods)})" for item in stray))
    configs = {}
    for method in methods:  # every config problem before the first hour of training
        raw = apply_overrides(read_config_file(config_path), method_overrides(method, overrides))
        configs[method] = load_config(config_path, [f"output.dir={out / method}"], raw=with_method(raw, method))
    if out.exists() and any(out.iterdir()):
        raise TunesmithError(f"{out} already holds files; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    rows, found = [], None
    for method in methods:
        print(f"== {method} ==", flush=True)
        # Each run reads its resolved config, as compare validated it.
        resolved = out / f"{method}.yaml"
        save_config(configs[method], resolved)
        argv = [sys.executable, "-m", "tunesmith.cli", "train", str(resolved)]
        if subprocess.run(argv).returncode != 0:
            raise TunesmithError(f"compare: training with method {method} failed; see the output above")
        rows.append(run_row(method, out / method, configs[method].train.lr))
        found = Run(out / method).load_json("metrics").get("baselines")  # every run's splits are the same
        write_tables(rows, out, found)  # after every method, so an interrupted comparison keeps what it has
    md, _ = write_tables(rows, out, found)
    return md
