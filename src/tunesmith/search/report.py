"""What a search leaves in its directory: ``best.yaml`` (the best trial's config, ready for
``tunesmith train``), ``search.md`` (the trials table) and two plots as PNG: the optimisation
history and the parameters' importance (PED-ANOVA, which needs no scikit-learn)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import yaml

BEST_RUN = "best"  # where best.yaml trains to, inside the search directory


def write_best(study, search_dir: Path, resolve: Callable[[dict], dict] | None = None) -> Path | None:
    """The best trial's resolved config, its output.dir set beside the trials; None before any trial completes.

    The config is the one the trial's run saved. A trial that ran on another machine (workers sharing
    a database) has no run directory here: ``resolve`` makes its config from the trial's parameters."""
    best = _best(study)
    if best is None:
        return None
    saved = Path(best.user_attrs["run_dir"]) / "config.yaml"
    if saved.is_file() or resolve is None:
        config = yaml.safe_load(saved.read_text())
    else:
        config = resolve(best.params)
    config["output"]["dir"] = str(search_dir / BEST_RUN)
    path = search_dir / "best.yaml"
    header = (f"# tunesmith train {path}\n#\n# The best trial of the search in {search_dir}: trial {best.number}, "
              f"objective {best.value:.6g}, parameters " + ", ".join(f"{k}={v}" for k, v in best.params.items()) + ".\n")
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def _best(study):
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return study.best_trial if complete else None


def write_report(study, search_dir: Path, objective: str) -> Path:
    """search.md: every trial with its state, parameters, value and steps, then the plots."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    params = list(dict.fromkeys(k for t in trials for k in t.params))
    lines = [f"# Search: {study.study_name}", "",
             f"Objective: {objective} ({study.direction.name.lower()}), on the validation split.", ""]
    best = _best(study)
    if best is not None:
        lines += [f"Best: trial {best.number}, {objective} {best.value:.4f}; its config: `best.yaml`.", ""]
    lines += ["| trial | state | " + " | ".join(params) + f" | {objective} | steps | run |",
              "|---:|---|" + "---:|" * len(params) + "---:|---:|---|"]
    for t in trials:
        run = t.user_attrs.get("run_dir")
        state = t.state.name.lower()
        if t.state == TrialState.FAIL and "error" not in t.user_attrs:
            state = "stopped (retried)"
        steps = t.user_attrs.get("steps") or (max(t.intermediate_values) if t.intermediate_values else None)
        cells = [str(t.number), state, *(_cell(t.params.get(p)) for p in params),
                 _cell(t.value), _cell(steps), f"`{Path(run).name}`" if run else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [(t.number, t.user_attrs["error"]) for t in trials if "error" in t.user_attrs]
    if errors:
        lines += ["", "Failed trials:", *(f"- trial {n}: {e}" for n, e in errors)]
    for name, title in (("history.png", "Optimisation history"), ("importance.png", "Parameter importance")):
        if (search_dir / name).is_file():
            lines += ["", f"## {title}", "", f"![{title}]({name})"]
    path = search_dir / "search.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_plots(study, search_dir: Path) -> list[Path]:
    """history.png (with at least one complete trial) and importance.png (with two, and a parameter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.trial import TrialState
    from optuna.visualization.matplotlib import (
        plot_optimization_history,
        plot_param_importances,
    )

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib plots are marked experimental
        if complete:
            written.append(_save(plot_optimization_history(study), search_dir / "history.png", plt))
        if len(complete) >= 2 and complete[0].params:
            ax = plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
            written.append(_save(ax, search_dir / "importance.png", plt))
    return written


def _save(ax, path: Path, plt) -> Path:
    ax.figure.savefig(path, bbox_inches="tight", dpi=100)
    plt.close(ax.figure)
    return path

