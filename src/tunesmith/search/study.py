"""The study: where it is stored, how a worker takes trials from it, and how one trial runs.

Every trial is a normal run directory, ``OUTPUT_DIR/trial_NNNN``, trained by ``recipe.run_training``
in the worker's process. The loop's validation losses go to the pruner as they come; a pruned run
ends with status ``pruned``. The study lives in an Optuna RDB storage (SQLite in the search
directory unless ``--storage`` names another database), so that:

- a search stopped at any point continues when the same command runs again: finished trials stay
  finished, and the trial it was running is retried from its run's last checkpoint;
- any number of workers, on this machine or others, take trials from one study. A worker killed
  outright stops its trial's heartbeat; after two heartbeats the trial is failed and queued again
  (Optuna's ``RetryHeartbeatStaleTrialCallback``), and the next worker resumes its run.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import RunConfig, load_config
from tunesmith.errors import TunesmithError
from tunesmith.search.space import SearchConfig, read_search_config, with_values
from tunesmith.session import load_run
from tunesmith.store import Run

STUDY_FILE = "study.sqlite"
TRIAL_DIR = "trial_{:04d}"
BASE_EVAL_DIR = "base_eval"  # the base model's evaluation, shared by the trials (recipe.base_eval_key)
SEED_STRIDE = 10_000  # keeps the seeds of up to that many workers apart
POLL_SECONDS = 5  # how often an idle worker looks whether the others' trials have ended


@dataclass
class Plan:
    """A search as its config describes it: the base run config, the space, the search directory."""

    path: str  # the config file (its directory resolves relative data paths)
    raw: dict  # the run config without its search section
    search: SearchConfig
    dir: Path
    storage_url: str

    @property
    def study_name(self) -> str:
        return self.search.study or self.dir.name

    def trial_config(self, values: dict, run_dir: Path) -> RunConfig:
        raw = with_values(self.raw, {**values, "output.dir": str(run_dir)})
        return load_config(self.path, raw=raw)


def load_plan(path: str, overrides: list[str], storage: str | None = None) -> Plan:
    """Read and check a search config: every problem of the space before the first trial."""
    raw, search = read_search_config(path, overrides)
    base = load_config(path, raw=with_values(raw, {}))
    if base.data.path and base.data.split.validation == 0 and not base.data.validation:
        raise TunesmithError(f"{path}: data.split.validation is 0: a search needs validation data to "
                             "compare trials on (never the test split)")
    out = Path(base.output.dir)
    if storage is None:
        if not Run(out, writer=False).is_new() and not (out / STUDY_FILE).is_file():
            raise TunesmithError(f"output.dir {out} already holds files that are not a search; choose "
                                 "another output.dir (--set output.dir=...)")
        storage = f"sqlite:///{(out / STUDY_FILE).resolve()}"
    return Plan(path, raw, search, out, storage)


def open_study(plan: Plan, worker: int = 0):
    """Create the study, or load it to continue; a stored study must have been started with the same
    space and objective. Each worker's sampler has its own seed (``search.seed + worker``, plus the
    trials already stored): with one seed, parallel workers, or a continued study, would sample the
    same values."""
    import optuna

    # Our own lines say what became of a trial; optuna would add a traceback for each stopped one.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats, retries
        return _open_study(plan, worker)


def _open_study(plan: Plan, worker: int):
    import optuna

    plan.dir.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(
        plan.storage_url,
        # Several workers on one SQLite file wait for its lock rather than fail at once.
        engine_kwargs={"connect_args": {"timeout": 60}} if plan.storage_url.startswith("sqlite") else None,
        heartbeat_interval=plan.search.heartbeat, grace_period=2 * plan.search.heartbeat,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
    study = optuna.create_study(storage=storage, study_name=plan.study_name, pruner=_pruner(plan.search),
                                direction=plan.search.direction, load_if_exists=True)
    # A sampler seeded as before would propose again, value for value, the trials a continued study
    # has already run: its seed also counts the trials stored when this worker opens the study.
    seed = plan.search.seed + worker + SEED_STRIDE * len(study.get_trials(deepcopy=False))
    study.sampler = (optuna.samplers.TPESampler(seed=seed, n_startup_trials=plan.search.random_trials)
                     if plan.search.sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed))
    signature = plan.search.model_dump(mode="json", include={"space", "objective"})
    stored = study.user_attrs.get("search")
    if stored is None:
        study.set_user_attr("search", signature)
    elif stored != signature:
        raise TunesmithError(f"study {plan.study_name!r} in {plan.storage_url} was started with another search "
                             "space or objective; give search.study (or output.dir) a new name")
    return study


def _pruner(search: SearchConfig):
    import optuna

    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials, n_warmup_steps=search.warmup_steps)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def progress(study) -> tuple[int, int, int]:
    """Trials ``(ended, running, waiting)``. A trial ends complete, pruned or failed by an error; one
    that was interrupted or lost its worker is not ended: a retry of it waits."""
    from optuna.trial import TrialState

    ended = running = waiting = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and "error" in t.user_attrs):
            ended += 1
        elif t.state == TrialState.RUNNING:
            running += 1
        elif t.state == TrialState.WAITING:
            waiting += 1
    return ended, running, waiting


def work(plan: Plan, trials: int, worker: int = 0) -> None:
    """Take trials from the study until ``trials`` of them have ended (by this or other workers).

    While the others' running trials would reach the count, wait for them: one of them may be a
    killed worker's trial, which is retried once its heartbeat is stale.
    """
    import optuna

    study = open_study(plan, worker)
    poll = min(plan.search.heartbeat, POLL_SECONDS)
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        ended, running, waiting = progress(study)
        if ended >= trials:
            return
        if waiting or ended + running < trials:
            study.optimize(lambda trial: run_trial(trial, plan), n_trials=1)
        else:
            time.sleep(poll)


def run_trial(trial, plan: Plan) -> float:
    """Train one trial's run and return its objective value (NaN, a failed trial, on a crash)."""
    import optuna

    values = {path: param.suggest(trial, path) for path, param in plan.search.space.items()}
    run_dir, resume = _run_dir(trial, plan)
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("pid", os.getpid())
    config = plan.trial_config(values, run_dir)
    sign = 1 if plan.search.direction == "minimize" else -1

    def on_step(state) -> None:
        if state.val_step == state.step:
            # The pruner compares trials in the study's direction; a maximised metric is pruned on
            # the validation loss, negated.
            trial.report(sign * state.val_loss, state.step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val_loss {state.val_loss:.4f} at step {state.step}")

    from tunesmith.recipe import run_training

    try:
        if Run(run_dir).status() != "complete":  # a retried trial whose run had finished is only scored
            # The base model is the same in every trial: it is evaluated once, by the first trial.
            run_training(config, resume=resume, on_step=on_step, base_cache=plan.dir / BASE_EVAL_DIR)
        value = objective_value(run_dir, plan.search.objective)
    except optuna.TrialPruned:
        Run(run_dir).set_status("pruned")
        raise
    except KeyboardInterrupt:
        # Stopped (Ctrl-C, SIGTERM): queue it again now, so that the next worker resumes its run.
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.RetryHeartbeatStaleTrialCallback()(trial.study, frozen)
        raise
    except TunesmithError as err:
        trial.set_user_attr("error", str(err))
        raise
    except Exception as err:  # noqa: BLE001 (one trial's crash, NaN say, must not end the search)
        trial.set_user_attr("error", f"{type(err).__name__}: {err}")
        print(f"trial {trial.number} failed: {type(err).__name__}: {err}")
        return math.nan
    trial.set_user_attr("steps", Run(run_dir).load_json("metrics", {}).get("steps"))
    return value


def _run_dir(trial, plan: Plan) -> tuple[Path, bool]:
    """A new trial's run directory; a retried trial's run, to resume where it has a checkpoint."""
    previous = trial.user_attrs.get("run_dir")
    if previous:
        run = Run(previous)
        # An interrupted run resumes from its checkpoint or, stopped before its first, starts again there.
        if run.status() in ("complete", "interrupted", "crashed"):
            return run.path, run.status() != "complete"
    return plan.dir / TRIAL_DIR.format(trial.number), False


def objective_value(run_dir: Path, objective: str) -> float:
    """The trial's score: its best validation loss, or a metric of the tuned model on the validation split."""
    run = Run(run_dir)
    if objective == "val_loss":
        value = run.load_json("metrics", {}).get("best_val_loss")
        if value is None:
            raise TunesmithError(f"{run_dir}: the run never validated; a search needs validation data")
        return value
    run, session, model = load_run(run_dir)
    data = session.prepare()
    if session.config.data.sources:
        metrics = session.score_sources(model, "validation")
    else:
        cap = session.config.eval.max_examples
        metrics = session.objective.evaluate(model, data.examples["validation"][:cap],
                                             data.encoded["validation"][:cap], run.labels())
    if objective not in metrics:
        raise TunesmithError(f"search.objective: {objective!r} is not a metric of this run; "
                             f"its metrics: val_loss, {', '.join(metrics)}")
    return float(metrics[objective])
