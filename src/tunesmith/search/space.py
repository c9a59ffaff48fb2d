"""The ``search:`` section of a config: the space of parameters, the objective, sampler and pruner.

A parameter is named by its dotted path in the run config (``train.lr``, ``method.r``) and given as
one of ``{log_uniform: [lo, hi]}``, ``{uniform: [lo, hi]}``, ``{int: [lo, hi]}`` (with an optional
``step``, and ``log: true`` for a log-spaced integer) or ``{choice: [a, b, ...]}``. Before a search
starts, every corner of the space (each bound, each choice) is validated against ``RunConfig``, so
a value the field itself refuses is reported before the first trial, with the parameter's path.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from tunesmith.config import DEFAULT_OBJECTIVE, apply_overrides, read_config_file, validate_config
from tunesmith.errors import TunesmithError
from tunesmith.eval.metrics import METRICS
from tunesmith.objectives import REGISTRY as OBJECTIVES
from tunesmith.objectives import abilities
from tunesmith.options import Section

Scalar = bool | int | float | str
Integer = int  # inside Param, `int` names the field


class Param(Section):
    """One dimension of the space: exactly one of the four kinds."""

    log_uniform: list[float] | None = Field(None, min_length=2, max_length=2)
    uniform: list[float] | None = Field(None, min_length=2, max_length=2)
    int: list[Integer] | None = Field(None, min_length=2, max_length=2)
    choice: list[Scalar] | None = None
    step: float | None = Field(None, gt=0, description="uniform or int: the grid spacing.")
    log: bool = Field(False, description="int: sample on a log scale.")

    @model_validator(mode="after")
    def _one_kind(self) -> Param:
        given = [k for k in ("log_uniform", "uniform", "int", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of log_uniform, uniform, int, choice"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.choice is not None and not self.choice:
            raise ValueError("choice: the list of values is empty")
        bounds = self.log_uniform or self.uniform or self.int
        if bounds is not None:
            low, high = bounds
            if low > high:
                raise ValueError(f"{given[0]}: the lower bound {low} is above the upper bound {high}")
            if (self.log_uniform or self.log) and low <= 0:
                raise ValueError(f"{given[0]}: a log scale needs a lower bound above 0, got {low}")
        if self.log and self.int is None:
            raise ValueError("log: true applies to int; use log_uniform for real numbers")
        if self.step is not None and (self.log_uniform or self.choice is not None or self.log):
            raise ValueError("step applies to uniform and to int without log")
        return self

    def corners(self) -> list[Scalar]:
        """The values at the edges of this dimension: both bounds, or every choice."""
        return list(self.choice) if self.choice is not None else list(self.log_uniform or self.uniform or self.int)

    def suggest(self, trial, path: str) -> Scalar:
        """The value an Optuna trial samples (or, for a retried or enqueued trial, was given)."""
        if self.choice is not None:
            return trial.suggest_categorical(path, self.choice)
        if self.int is not None:
            return trial.suggest_int(path, *self.int, step=int(self.step or 1), log=self.log)
        if self.log_uniform is not None:
            return trial.suggest_float(path, *self.log_uniform, log=True)
        return trial.suggest_float(path, *self.uniform, step=self.step)


class SearchConfig(Section):
    space: dict[str, Param] = Field(min_length=1, description="Dotted config path -> its range.")
    objective: str = Field(
        "val_loss", description="val_loss (the best validation loss the loop reached), or a metric of the "
        "tuned model on the validation split (eval.metrics.METRICS: loss, perplexity, accuracy, macro_f1, "
        "reward_margin). Never the test split."
    )
    sampler: Literal["tpe", "random"] = "tpe"
    random_trials: int = Field(
        4, ge=1, description="tpe: trials sampled at random before TPE models the results (Optuna's default, "
        "10, would leave a 12-trial search almost all random)."
    )
    seed: int = 0
    pruner: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = Field(2, ge=0, description="Trials run to the end before the median pruner prunes.")
    warmup_steps: int = Field(0, ge=0, description="Steps within a trial before it may be pruned.")
    study: str | None = Field(None, description="The study's name in its storage; default: output.dir's name.")
    heartbeat: int = Field(
        60, ge=1, description="Seconds between a running trial's heartbeats; a trial silent for two of them "
        "(its worker killed) is failed and retried."
    )

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, objective: str) -> str:
        # The loop's best validation loss, or a metric of the objectives (``eval.metrics.METRICS``)
        # scored on the validation split; SOURCE/metric with data.sources.
        if objective != "val_loss" and objective.rsplit("/", 1)[-1] not in METRICS:
            raise ValueError(f"unknown objective {objective!r}; give val_loss, or a validation metric: "
                             f"{', '.join(METRICS)} (SOURCE/metric with data.sources)")
        return objective

    @property
    def direction(self) -> str:
        metric = self.objective.rsplit("/", 1)[-1]
        return "maximize" if metric in METRICS and METRICS[metric].higher_is_better else "minimize"


def set_path(raw: dict, path: str, value) -> bool:
    """Put ``value`` at the dotted ``path`` of a raw config, creating sections; False if a parent on
    the way is a value, not a section."""
    node = raw
    *parents, leaf = path.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return False
        node = child
    node[leaf] = value
    return True


def with_values(raw: dict, values: dict[str, Scalar]) -> dict:
    """A deep copy of ``raw`` with each path set to its value."""
    import copy

    raw = copy.deepcopy(raw)
    for path, value in values.items():
        set_path(raw, path, value)
    return raw


def read_search_config(path: str, overrides: list[str]) -> tuple[dict, SearchConfig]:
    """The run config's raw mapping (without ``search:``) and its validated search section.

    Every problem of the space is reported at once: its own shape, then each corner of it
    validated as a run config.
    """
    raw = apply_overrides(read_config_file(path), overrides)
    section = raw.pop("search", None)
    if section is None:
        raise TunesmithError(f"{path}: no search section; add `search: {{space: {{train.lr: "
                             "{{log_uniform: [1e-5, 1e-2]}}}}}}` (see docs/search.md)")
    if not isinstance(section, dict) or not isinstance(section.get("space"), dict):
        raise TunesmithError(f"{path}: search.space: expected a mapping of config paths to ranges, e.g. "
                             "train.lr: {log_uniform: [1e-5, 1e-2]}")
    # Each parameter on its own, so that a malformed one does not hide the others' problems.
    problems, space = [], {}
    for name, spec in section["space"].items():
        try:
            space[name] = Param.model_validate(spec)
        except ValidationError as err:
            problems += _problems(err, path, ("space", name))
    try:
        search = SearchConfig.model_validate({**section, "space": space or section["space"]})
    except ValidationError as err:
        problems += _problems(err, path, ())
        search = None
    if search is not None:
        problems += check_metric(raw, search, path)
        try:
            check_space(raw, search, path)
        except TunesmithError as err:
            problems += err.problems
    if problems:
        raise TunesmithError(*dict.fromkeys(problems))
    return raw, search


def check_metric(raw: dict, search: SearchConfig, source: str) -> list[str]:
    """The search's metric must be one the run's objective reports (``Abilities.metrics``)."""
    section = raw.get("objective")
    name = section.get("name", DEFAULT_OBJECTIVE) if isinstance(section, dict) else DEFAULT_OBJECTIVE
    metric = search.objective.rsplit("/", 1)[-1]
    if search.objective == "val_loss" or name not in OBJECTIVES or metric in abilities(name).metrics:
        return []
    return [f"{source}: search.objective: objective {name} reports {', '.join(abilities(name).metrics)} "
            f"(or val_loss), not {metric}"]


def _problems(err: ValidationError, path: str, prefix: tuple) -> list[str]:
    lines = []
    for e in err.errors():
        loc = [*prefix, *e["loc"]]
        # A parameter's own problems are said of the parameter: search.space.train.lr, not ...lr.choice.
        if len(loc) >= 3 and loc[0] == "space" and loc[2] in Param.model_fields:
            loc = loc[:2]
        lines.append(f"{path}: search.{'.'.join(map(str, loc))}: {e['msg'].removeprefix('Value error, ')}")
    return lines


def check_space(raw: dict, search: SearchConfig, source: str) -> None:
    """Validate the run config at every corner of the space; one line per refused corner."""
    problems: list[str] = []
    first = {path: param.corners()[0] for path, param in search.space.items()}
    for path, param in search.space.items():
        if path.split(".")[0] == "output":
            problems.append(f"{source}: search.space.{path}: the search sets output itself (one run per trial)")
            continue
        if not set_path(with_values(raw, {}), path, None):
            problems.append(f"{source}: search.space.{path}: unknown parameter path")
            continue
        for value in param.corners():
            try:
                validate_config(with_values(raw, {**first, path: value}), source)
            except TunesmithError as err:
                problems += [_about(p, source, path, value) for p in err.problems]
    if problems:
        raise TunesmithError(*dict.fromkeys(problems))  # once each, in order


def _about(problem: str, source: str, path: str, value) -> str:
    """A run-config problem, said of the search parameter that caused it (others kept as they are)."""
    where, _, message = problem.removeprefix(f"{source}: ").partition(": ")
    if where != path and not path.startswith(where + "."):
        return problem
    if message.startswith("unknown field"):
        return f"{source}: search.space.{path}: unknown parameter path ({message})"
    return f"{source}: search.space.{path}: {value!r} is refused ({message})"
