"""`tunesmith search` on a tiny model: trials, best.yaml, the report, resuming after a kill, two
workers on one study, pruning, and one clear line for each bad search space."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import cli_fails, write_config

ROOT = Path(__file__).parent.parent
SPACE = {"train.lr": {"log_uniform": [1e-3, 1e-1]}, "method.r": {"choice": [2, 4]}}


def search_config(tmp_path, model_dir, data, space=None, train=None, **search) -> Path:
    path = write_config(tmp_path / "search.yaml", model_dir, data,
                        train={"max_steps": 4, "eval_every": 2, "save_every": 1, **(train or {})},
                        eval={"samples": 0, "max_new_tokens": 2, "max_examples": 8},
                        output={"dir": str(tmp_path / "search")})
    raw = yaml.safe_load(path.read_text())
    raw["search"] = {"space": space or SPACE, "pruner": "none", **search}
    path.write_text(yaml.safe_dump(raw))
    return path


def finished(search_dir: Path) -> dict[int, dict]:
    """The study's trials by number: state, run dir, params (read through optuna, as a user would)."""
    import optuna

    study = optuna.load_study(study_name=search_dir.name, storage=f"sqlite:///{search_dir / 'study.sqlite'}")
    return {t.number: {"state": t.state.name, "run_dir": t.user_attrs.get("run_dir"), "params": t.params,
                       "pid": t.user_attrs.get("pid"), "retried": t.system_attrs.get("failed_trial")}
            for t in study.trials}


def test_search_runs_its_trials_and_writes_best_yaml_and_the_report(tmp_path, tiny_model_dir, review_data, capsys):
    import optuna

    from tunesmith.cli import main
    from tunesmith.config import load_config
    from tunesmith.store import Run

    config = search_config(tmp_path, tiny_model_dir, review_data)
    assert main(["search", str(config), "--trials", "3"]) == 0
    out = tmp_path / "search"
    trials = finished(out)
    # The base model is evaluated by the first trial only; the others read its evaluation.
    printed = capsys.readouterr().out
    assert printed.count("evaluating the base model") == 1 and printed.count("base model's evaluation read") == 2
    assert [t["state"] for t in trials.values()] == ["COMPLETE"] * 3
    runs = [Run(t["run_dir"]) for t in trials.values()]
    assert {r.path.parent for r in runs} == {out} and all(r.status() == "complete" for r in runs)
    # Each trial trained with its own sampled values.
    for t, run in zip(trials.values(), runs):
        saved = run.load_config()
        assert saved.train.lr == t["params"]["train.lr"] and saved.method.r == t["params"]["method.r"]
    assert len({json.dumps(r.load_json("base_eval"), sort_keys=True) for r in runs}) == 1
    best = load_config(out / "best.yaml")
    values = {t.number: t.value for t in optuna.load_study(study_name="search",
                                                          storage=f"sqlite:///{out / 'study.sqlite'}").trials}
    best_trial = min(values, key=values.get)
    assert best.train.lr == trials[best_trial]["params"]["train.lr"]
    assert best.output.dir == str(out / "best")
    assert (out / "best.yaml").read_text().startswith(f"# tunesmith train {out / 'best.yaml'}")
    report = (out / "search.md").read_text()
    assert report.count("| complete |") == 3 and "train.lr" in report
    assert (out / "history.png").stat().st_size > 0 and (out / "importance.png").stat().st_size > 0
    # Run again with as many trials: nothing to do, nothing repeated.
    assert main(["search", str(config), "--trials", "3"]) == 0
    assert finished(out) == trials


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "tunesmith.cli", "search", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_search_continues_without_repeating_finished_trials(tmp_path, tiny_model_dir, review_data, sig):
    config = search_config(tmp_path, tiny_model_dir, review_data, train={"max_steps": 12, "eval_every": 6},
                           heartbeat=1)
    out = tmp_path / "search"
    proc = subprocess.Popen(_cli(str(config), "--trials", "2"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    second = out / "trial_0001" / "checkpoints" / "last" / "state.json"
    deadline = time.monotonic() + 300  # a bound on waiting for a hung child, not a figure under test
    while not second.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert second.is_file(), "the second trial never saved a checkpoint"
    proc.send_signal(sig)
    proc.wait(60)
    before = finished(out)
    assert before[0]["state"] == "COMPLETE" and before[1]["state"] in ("RUNNING", "FAIL")
    first_started = json.loads((out / "trial_0000" / "status.json").read_text())["started_at"]
    killed_at = json.loads(second.read_text())["step"]

    done = subprocess.run(_cli(str(config), "--trials", "2"), check=False, env=_env(), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    after = finished(out)
    complete = [t for t in after.values() if t["state"] == "COMPLETE"]
    # Trial 0 was not run again; trial 1 was retried once, in its own run, from its checkpoint.
    assert len(complete) == 2 and after[0] == before[0]
    retry = next(t for t in complete if t["retried"] == 1)
    assert retry["params"] == before[1]["params"] and retry["run_dir"] == str(out / "trial_0001")
    assert json.loads((out / "trial_0000" / "status.json").read_text())["started_at"] == first_started
    steps = [json.loads(line)["step"] for line in (out / "trial_0001" / "metrics.jsonl").read_text().splitlines()
             if "loss" in line and "val_loss" not in line]
    assert killed_at > 0 and steps.count(1) == 1 and max(steps) == 12  # resumed, not restarted from step 1


def test_two_workers_on_one_study_never_run_the_same_trial(tmp_path, tiny_model_dir, review_data, capsys):
    from tunesmith.cli import main

    config = search_config(tmp_path, tiny_model_dir, review_data)
    assert main(["search", str(config), "--trials", "4", "--workers", "2"]) == 0
    trials = finished(tmp_path / "search")
    complete = [t for t in trials.values() if t["state"] == "COMPLETE"]
    run_dirs = [t["run_dir"] for t in complete]
    assert len(complete) >= 4 and len(set(run_dirs)) == len(run_dirs)
    assert len({t["pid"] for t in complete}) == 2  # both workers took trials
    for run_dir in run_dirs:  # each run trained once: one status, one log from step 1
        log = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]


def test_pruning_ends_a_bad_trial_early_as_pruned(tmp_path, tiny_model_dir, review_data):
    import optuna

    from tunesmith.search import search
    from tunesmith.search.study import load_plan, open_study
    from tunesmith.store import Run

    config = search_config(tmp_path, tiny_model_dir, review_data, space={"train.lr": {"log_uniform": [1e-7, 1e-1]}},
                           train={"max_steps": 12, "eval_every": 2}, pruner="median", startup_trials=1)
    study = open_study(load_plan(str(config), []))
    study.enqueue_trial({"train.lr": 0.05})  # learns
    study.enqueue_trial({"train.lr": 1e-7})  # cannot: its validation loss stays above the first's
    search(str(config), 2)
    trials = finished(tmp_path / "search")
    assert [t["state"] for t in trials.values()] == ["COMPLETE", "PRUNED"]
    pruned = Run(trials[1]["run_dir"])
    assert pruned.status() == "pruned" and not (pruned.path / "metrics.json").exists()
    steps = [json.loads(line)["step"] for line in pruned.metrics_log.read_text().splitlines()]
    assert max(steps) < 12
    assert "| pruned |" in (tmp_path / "search" / "search.md").read_text()
    assert optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'search' / 'study.sqlite'}"
                             ).trials[1].intermediate_values


@pytest.mark.parametrize(("space", "fragment"), [
    ({"train.learning_rate": {"log_uniform": [1e-5, 1e-2]}}, "search.space.train.learning_rate: unknown parameter path"),
    ({"method.rank": {"choice": [8, 16]}}, "search.space.method.rank: unknown parameter path"),
    ({"method.r": {"choice": []}}, "search.space.method.r: choice: the list of values is empty"),
    ({"train.lr": {"log_uniform": [1e-5, 2.0]}}, "search.space.train.lr: 2.0 is refused (Input should be less than or equal to 1)"),
    ({"train.epochs": {"int": [0, 3]}}, "search.space.train.epochs: 0 is refused (Input should be greater than 0)"),
    ({"train.lr": {"log_uniform": [0, 1e-2]}}, "search.space.train.lr: log_uniform: a log scale needs a lower bound above 0"),
    ({"train.lr": {"uniform": [1e-2, 1e-5]}}, "search.space.train.lr: uniform: the lower bound 0.01 is above"),
    ({"output.dir": {"choice": ["a", "b"]}}, "search.space.output.dir: the search sets output itself"),
    ({"train.lr": {"log_uniform": [1e-5, 1e-2]}, "objective": "bleu"}, "search.objective: unknown objective 'bleu'"),
    ({"train.lr": {"log_uniform": [1e-5, 1e-2]}, "objective": "reward_margin"},
     "search.objective: objective causal reports loss, perplexity, accuracy, macro_f1 (or val_loss), not reward_margin"),
])
def test_a_bad_search_space_is_one_clear_line(tmp_path, tiny_model_dir, review_data, capsys, space, fragment):
    space = dict(space)
    extra = {"objective": space.pop("objective")} if "objective" in space else {}
    config = search_config(tmp_path, tiny_model_dir, review_data, space=space, **extra)
    err = cli_fails(capsys, ["search", str(config), "--trials", "2"], fragment)
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "search").exists()


def test_no_search_section_and_every_problem_at_once(tmp_path, tiny_model_dir, review_data, capsys):
    plain = write_config(tmp_path / "plain.yaml", tiny_model_dir, review_data)
    cli_fails(capsys, ["search", str(plain), "--trials", "2"], "no search section")
    config = search_config(tmp_path, tiny_model_dir, review_data,
                           space={"train.lr": {"log_uniform": [1e-5, 2.0]}, "method.r": {"choice": []}})
    err = cli_fails(capsys, ["search", str(config), "--trials", "2"], "search.space.train.lr", "search.space.method.r")
    assert len(err.strip().splitlines()) == 2


def test_a_validation_metric_objective_is_maximised_on_the_validation_split(tmp_path, tiny_model_dir, review_data):
    import optuna

    from tunesmith.search import search
    from tunesmith.session import load_run

    config = search_config(tmp_path, tiny_model_dir, review_data, space={"train.lr": {"choice": [0.05]}},
                           objective="accuracy")
    search(str(config), 1)
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'search' / 'study.sqlite'}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    run, session, model = load_run(study.trials[0].user_attrs["run_dir"])
    data = session.prepare()
    expected = session.objective.evaluate(model, data.examples["validation"][:8], data.encoded["validation"][:8],
                                          run.labels())["accuracy"]
    assert study.trials[0].value == expected


SEARCH_EXAMPLES = [e for e in sorted((ROOT / "examples").glob("*.yaml")) if "\nsearch:" in e.read_text()]


@pytest.mark.parametrize("example", SEARCH_EXAMPLES, ids=[e.name for e in SEARCH_EXAMPLES])
def test_shipped_search_examples_pass_every_check_of_their_space(example):
    from tunesmith.search.study import load_plan

    plan = load_plan(str(example), [])
    assert plan.search.space and example.read_text().startswith(f"# tunesmith search examples/{example.name}")


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_continued_study_does_not_propose_the_values_it_ran_before(tmp_path, tiny_model_dir, review_data, sampler):
    from tunesmith.search.study import load_plan, open_study

    plan = load_plan(str(search_config(tmp_path, tiny_model_dir, review_data, sampler=sampler)), [])
    first = open_study(plan)
    asked = first.ask()
    values = {path: param.suggest(asked, path) for path, param in plan.search.space.items()}
    first.tell(asked, 1.0)
    # The command run again opens the study anew, with the same search.seed.
    again = open_study(plan).ask()
    assert {path: param.suggest(again, path) for path, param in plan.search.space.items()} != values
