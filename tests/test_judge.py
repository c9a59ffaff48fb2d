"""Judged evaluation on tiny models: a DPO run judged by a classifier run at the end of training and
by `tunesmith judge`; the same seed gives a model identical to its base the same answers (every pair
a tie, KL 0); full fine-tuning is judged against the base loaded again; bad runs fail with one line."""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import replace
from types import SimpleNamespace

import pytest
import yaml
from conftest import cli_fails, preference_rows, review_rows, write_config, write_jsonl

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.judge import Judge, Sampling, judge_model, judge_run
from tunesmith.recipe import run_training
from tunesmith.session import Session

ROOT = Path(__file__).parent.parent


def _train(tmp: Path, model_dir: Path, data: dict, name: str, steps: int, **sections) -> Path:
    config = write_config(tmp / f"{name}.yaml", model_dir, data, train={"max_steps": steps, "eval_every": steps},
                          output={"dir": str(tmp / name)}, **sections)
    run_training(load_config(config))
    return tmp / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> SimpleNamespace:
    """A classifier run (the judge) and a DPO run trained with ``eval.judge`` naming it."""
    tmp = tmp_path_factory.mktemp("judged")
    reviews = write_jsonl(tmp / "reviews.jsonl", review_rows(120))
    classifier = _train(tmp, tiny_model_dir, {
        "path": str(reviews), "format": "classification", "columns": {"text": "review", "label": "sentiment"},
        "label_map": {"fresh": "positive", "rotten": "negative"}, "max_length": 64,
        "split": {"validation": 0.15, "test": 0.15}}, "classifier", 2, objective={"name": "classification"})
    pairs = write_jsonl(tmp / "pairs.jsonl", preference_rows(60))
    # eval.judge relative to the config file, as in the shipped example.
    data = {"path": str(pairs), "max_length": 96, "split": {"validation": 0.15, "test": 0.15}}
    dpo = _train(tmp, tiny_model_dir, data, "dpo", 6, objective={"name": "dpo"}, eval={"judge": "classifier"})
    return SimpleNamespace(classifier=classifier, dpo=dpo, tmp=tmp)


def _sections(report: Path) -> list[str]:
    return [line for line in report.read_text().splitlines() if line.startswith("## Judged by ")]


def _win_rate(result: dict) -> float:
    pairs = list(zip(result["tuned"]["rewards"], result["base"]["rewards"]))
    return sum(1.0 if t > b else 0.5 if t == b else 0.0 for t, b in pairs) / len(pairs)


def test_a_dpo_run_is_judged_at_the_end_of_training_and_again_by_judge_run(runs):
    metrics = json.loads((runs.dpo / "metrics.json").read_text())
    judged = json.loads((runs.dpo / "judged.json").read_text())
    test_pairs = json.loads((runs.dpo / "data_stats.json").read_text())["rows"]["test"]
    assert metrics["judged"]["judge"] == str(runs.classifier) and metrics["judged"]["label"] == "positive"
    # Every test prompt (fewer than the default 40), two answers each by default.
    assert (judged["split"], judged["prompts"], judged["answers"]) == ("test", test_pairs, 2 * test_pairs)
    assert (runs.dpo / "judged.png").is_file()
    assert _sections(runs.dpo / "report.md") == ["## Judged by classifier"]

    result = judge_run(runs.dpo, runs.classifier, prompts=4, samples_per_prompt=2, max_new_tokens=8)
    assert result["answers"] == 8 == result["wins"] + result["ties"] + result["losses"]
    assert 0.0 <= result["win_rate"] <= 1.0 and result["win_rate"] == pytest.approx(_win_rate(result))
    assert result["base"]["kl"] == pytest.approx(0.0, abs=1e-4)  # the base against itself
    assert result["tuned"]["kl"] > 0.01  # DPO moved the adapter: the tuned answers are no longer the base's
    assert result["reference"] == "the adapter disabled"
    # Replaced, not repeated: one section, judged.json and metrics.json with the new figures.
    report = (runs.dpo / "report.md").read_text()
    assert _sections(runs.dpo / "report.md") == ["## Judged by classifier"]
    assert "over 8 pairs of answers" in report and "![rewards of base and tuned answers](judged.png)" in report
    assert report.index("## Judged by") < report.index("## Data")  # in place, where training put it
    assert json.loads((runs.dpo / "judged.json").read_text())["answers"] == 8
    assert json.loads((runs.dpo / "metrics.json").read_text())["judged"]["answers"] == 8
    assert json.loads((runs.dpo / "metrics.json").read_text())["tuned"] == metrics["tuned"]  # the rest kept


def test_judge_through_the_cli(runs, capsys):
    from tunesmith.cli import main

    code = main(["judge", str(runs.dpo), "--by", str(runs.classifier), "--prompts", "2", "--samples", "1",
                 "--max-new-tokens", "4", "--seed", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "win-rate" in out and f"report: {runs.dpo / 'report.md'}" in out
    judged = json.loads((runs.dpo / "judged.json").read_text())
    assert (judged["answers"], judged["seed"], judged["max_new_tokens"]) == (2, 3, 4)


def test_a_judge_is_checked_at_once_but_loaded_only_when_it_first_scores(runs, monkeypatch):
    """So a judge named in a training config is not held in memory while the model trains."""
    from tunesmith import judge as judging

    loads, real = [], judging.load_reward
    monkeypatch.setattr(judging, "load_reward", lambda *args: loads.append(args) or real(*args))
    judge = judging.load_judge(runs.classifier, "positive", "cpu")
    assert loads == [] and judge.label == "positive"
    first = judge.score(["a film"], ["a great film"])
    assert judge.score(["a film"], ["a great film"]) == first and len(first) == 1
    assert len(loads) == 1  # loaded once, on the first score
    with pytest.raises(TunesmithError, match="^eval.judge_label: "):
        judging.load_judge(runs.classifier, "no-such-label", "cpu", "eval.judge", "eval.judge_label")
    assert len(loads) == 1


def _session(tmp_path: Path, model_dir: Path, data: dict, method: dict) -> tuple[Session, object]:
    config = load_config(write_config(tmp_path / "c.yaml", model_dir, data, objective={"name": "dpo"}, method=method))
    session = Session(config)
    session.prepare()
    model = session.method.apply(session.load_model([]), config.method)
    return session, model


def _letter_e(prompts: list[str], answers: list[str]) -> list[float]:
    return [float(a.count("e")) for a in answers]


TOY = Judge(Path("toy"), None, _letter_e)
SAMPLING = Sampling(prompts=4, samples_per_prompt=2, max_new_tokens=6)


def test_a_model_that_is_its_base_gives_the_same_answers_every_pair_a_tie(tmp_path, tiny_model_dir, preference_data):
    session, model = _session(tmp_path, tiny_model_dir, preference_data, {"name": "lora"})  # LoRA's B starts at 0
    result = judge_model(session, model, [], TOY, SAMPLING)
    assert result["tuned"]["answers"] == result["base"]["answers"]
    assert result["ties"] == result["answers"] == 8 and result["win_rate"] == 0.5
    assert result["tuned"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert result["base"]["kl"] == pytest.approx(0.0, abs=1e-5)


def test_full_fine_tuning_is_judged_against_the_base_loaded_again(tmp_path, tiny_model_dir, preference_data):
    import torch

    session, model = _session(tmp_path, tiny_model_dir, preference_data, {"name": "full"})
    with torch.no_grad():  # as if training had moved every weight
        torch.manual_seed(1)
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    result = judge_model(session, model, [], TOY, SAMPLING)
    assert result["reference"] == "the base model loaded again"
    assert result["tuned"]["answers"] != result["base"]["answers"]
    assert result["base"]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert result["tuned"]["kl"] > 0.01


def _interrupted_copy(run: Path, path: Path) -> Path:
    path.mkdir()
    (path / "config.yaml").write_text((run / "config.yaml").read_text())
    (path / "status.json").write_text(json.dumps({"status": "interrupted"}))
    return path


@pytest.mark.parametrize("case", ["run_missing", "run_not_complete", "run_not_generative", "run_is_ppo",
                                  "judge_missing", "judge_not_a_scorer", "unknown_label"])
def test_bad_runs_fail_with_one_line(runs, tmp_path, capsys, case):
    run, judge, extra = runs.dpo, runs.classifier, []
    if case == "run_missing":
        run, expected = tmp_path / "nowhere", "no such run directory"
    elif case == "run_not_complete":
        run = _interrupted_copy(runs.dpo, tmp_path / "stopped")
        expected = "the run is not complete (status: interrupted)"
    elif case == "run_not_generative":
        run, expected = runs.classifier, "is a classification run: judged evaluation needs a run that writes answers"
    elif case == "run_is_ppo":
        run = tmp_path / "ppo"
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"ppo": {"prompts": "p.jsonl"}}))
        expected = "is a PPO run"
    elif case == "judge_missing":
        judge, expected = tmp_path / "nowhere", "--by: "
    elif case == "judge_not_a_scorer":
        judge, expected = runs.dpo, "--by: "
    else:
        extra, expected = ["--label", "glowing"], "--label: 'glowing' is not a label"
    more = {"judge_missing": "no such run directory", "judge_not_a_scorer": "is a dpo run, not a classifier or "
            "reward model"}.get(case, expected)
    err = cli_fails(capsys, ["judge", str(run), "--by", str(judge), *extra], expected, more)
    assert len(err.strip().splitlines()) == 1


def test_eval_judge_problems_stop_training_before_it_starts(tmp_path, tiny_model_dir, preference_data, capsys):
    missing = write_config(tmp_path / "a.yaml", tiny_model_dir, preference_data, objective={"name": "dpo"},
                           eval={"judge": "no_such_run"}, output={"dir": str(tmp_path / "a")})
    err = cli_fails(capsys, ["train", str(missing)], f"eval.judge: {tmp_path / 'no_such_run'}: no such run directory")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()  # nothing written
    wrong = write_config(tmp_path / "b.yaml", tiny_model_dir, preference_data, objective={"name": "reward"},
                         eval={"judge": "no_such_run"})
    cli_fails(capsys, ["train", str(wrong)], "eval.judge: objective reward lacks the ability causal_answers")


def test_eval_judge_is_read_from_the_config_files_folder_and_can_be_set(tmp_path, tiny_model_dir, preference_data):
    (tmp_path / "conf").mkdir()
    (tmp_path / "judges" / "sentiment").mkdir(parents=True)
    path = write_config(tmp_path / "conf" / "c.yaml", tiny_model_dir, preference_data, objective={"name": "dpo"},
                        eval={"judge": "../judges/reward"})
    assert Path(load_config(path).eval.judge) == tmp_path / "conf" / "../judges/reward"
    config = load_config(path, ["eval.judge=../judges/sentiment", "eval.judge_label=fresh"])
    assert Path(config.eval.judge).resolve() == tmp_path / "judges" / "sentiment"
    assert config.eval.judge_label == "fresh"
    assert load_config(path, ["eval.judge=null"]).eval.judge is None


def test_the_dpo_example_is_judged_by_the_reward_example_trained_first():
    dpo, reward = ROOT / "examples" / "rotten_tomatoes_dpo.yaml", ROOT / "examples" / "rotten_tomatoes_reward.yaml"
    judge = Path(load_config(dpo).eval.judge)
    # Both commands run from the repository root, where output.dir is read.
    assert judge.resolve() == (ROOT / load_config(reward).output.dir).resolve()
    header = [line for line in dpo.read_text().splitlines() if line.startswith("#")]
    assert any("tunesmith train examples/rotten_tomatoes_reward.yaml" in line for line in header)


def test_an_answer_depends_on_its_seed_not_on_the_prompts_sampled_beside_it(tmp_path, tiny_model_dir,
                                                                           preference_data):
    import torch

    from tunesmith.align.rollout import answer_texts
    from tunesmith.judge import _sample, held_out_prompts

    session, model = _session(tmp_path, tiny_model_dir, preference_data, {"name": "lora"})
    prompts = held_out_prompts(session, 4)[1]
    ids = [session.tokenizer(p["framed"], add_special_tokens=False).input_ids for p in prompts]
    assert len({len(i) for i in ids}) > 1  # prompts of several lengths: padded differently in each batch

    def answers(*chunks: range) -> list[str]:
        return [a for chunk in chunks
                for a in answer_texts(session.tokenizer, _sample(model.eval(), session.tokenizer, ids, chunk,
                                                                 SAMPLING, "cpu"))]

    together = answers(range(4))
    assert answers(range(2), range(2, 4)) == together == answers(range(1), range(1, 3), range(3, 4))
    assert together[0] != together[1]  # each answer its own draw, even to the same prompt
    torch.manual_seed(123)
    assert answers(range(4)) == together  # the caller's random stream plays no part
    other = _sample(model, session.tokenizer, ids, range(4), replace(SAMPLING, seed=1), "cpu")
    assert answer_texts(session.tokenizer, other) != together
