"""``tunesmith search``: hyperparameter search on Optuna, one normal run per trial.

``space.py`` reads and checks the ``search:`` section, ``study.py`` holds the study, the workers and
one trial's run, ``report.py`` writes best.yaml, search.md and the plots.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import warnings
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.search.report import BEST_RUN, write_best, write_plots, write_report
from tunesmith.search.study import load_plan, open_study, work
from tunesmith.stopping import on_sigterm


def search(config_path: str, trials: int, workers: int = 1, storage: str | None = None,
           overrides: list[str] | None = None) -> Path:
    """Run the search until ``trials`` trials have ended, with ``workers`` processes here; returns
    the path of search.md. Run again, it continues the stored study."""
    plan = load_plan(config_path, overrides or [], storage)
    study = open_study(plan)  # created once here, before workers race to create it
    if workers == 1:
        work(plan, trials)
    else:
        _work_in_processes(plan, trials, workers)
    write_best(study, plan.dir, lambda params: plan.trial_config(params, plan.dir / BEST_RUN).model_dump(mode="json"))
    write_plots(study, plan.dir)
    return write_report(study, plan.dir, plan.search.objective)


def _work_in_processes(plan, trials: int, workers: int) -> None:
    # Spawned, not forked: each worker starts with its own torch threads and no copied locks.
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker, args=(plan, trials, i)) for i in range(workers)]
    for p in processes:
        p.start()
    terminated = []

    def terminate(signum, frame) -> None:
        # Each worker stops its trial where it is, with a checkpoint, and queues it again.
        terminated.append(signum)
        for p in processes:
            p.terminate()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        for p in processes:
            p.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if terminated:
        raise KeyboardInterrupt
    failed = [p.exitcode for p in processes if p.exitcode]
    if failed:
        raise TunesmithError(f"search: {len(failed)} of {workers} workers failed (exit status "
                             f"{', '.join(map(str, failed))}); see their output above; run the command again "
                             "to continue the study")


def _worker(plan, trials: int, index: int) -> None:
    """A worker process: the CLI's one line per problem, not a traceback."""
    warnings.filterwarnings("ignore")
    try:
        with on_sigterm():  # the parent's terminate(): the trial stops at once, with a checkpoint
            work(plan, trials, index)
    except TunesmithError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
