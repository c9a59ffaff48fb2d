"""`tunesmith score`: a reward-model run's rewards, a classifier's probability of a label, and one
clear line for runs that cannot score."""

from __future__ import annotations

import math

import pytest

from conftest import cli_fails, preference_rows, review_rows, write_config, write_jsonl
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.objectives.reward import score_texts
from tunesmith.recipe import run_training
from tunesmith.score import load_scorer
from tunesmith.session import load_run

TRAIN = {"max_steps": 2, "eval_every": 2, "save_every": 2}


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("reward")
    data = {"path": str(write_jsonl(tmp / "pairs.jsonl", preference_rows(30))), "max_length": 96}
    run_training(load_config(write_config(tmp / "c.yaml", tiny_model_dir, data, objective={"name": "reward"},
                                          train=TRAIN)))
    return tmp / "run"


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("classifier")
    data = {"path": str(write_jsonl(tmp / "reviews.jsonl", review_rows(40))), "format": "classification",
            "columns": {"text": "review", "label": "sentiment"}, "label_map": {"fresh": "positive", "rotten": "negative"},
            "max_length": 64}
    run_training(load_config(write_config(tmp / "c.yaml", tiny_bert_dir, data, objective={"name": "classification"},
                                          train=TRAIN)))
    return tmp / "run"


def _scores(out: str) -> list[float]:
    return [float(line.split("\t")[0]) for line in out.strip().splitlines()]


def test_score_prints_a_reward_models_rewards(reward_run, tmp_path, capsys):
    assert main(["score", str(reward_run), "the film is great", "the film is dull"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == "# reward"
    _, session, model = load_run(reward_run)
    assert _scores(captured.out) == pytest.approx(
        score_texts(model, session.tokenizer, ["the film is great", "the film is dull"]), abs=1e-4)
    # --prompt frames each text as an answer, as in training; --file adds texts.
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "the plot is fun"}])
    assert main(["score", str(reward_run), "the cast is weak", "--prompt", "review the film", "--file", str(texts)]) == 0
    scorer = load_scorer(reward_run)
    want = scorer.score([scorer.frame("review the film", t) for t in ("the cast is weak", "the plot is fun")])
    assert _scores(capsys.readouterr().out) == pytest.approx(want, abs=1e-4)


def test_score_prints_a_classifiers_probability_of_positive(classifier_run, capsys):
    assert main(["score", str(classifier_run), "a great film", "a dull film"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == "# P(positive)"
    scores = _scores(captured.out)
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)
    assert main(["score", str(classifier_run), "a great film", "--label", "negative"]) == 0
    assert _scores(capsys.readouterr().out)[0] == pytest.approx(1 - scores[0], abs=1e-4)
    cli_fails(capsys, ["score", str(classifier_run), "x", "--label", "nope"], "--label: 'nope' is not a label")


def test_score_and_the_ppo_reward_of_a_classifier_are_one_scorer(classifier_run):
    from tunesmith.align.rewards import load_reward

    texts = ["a great film", "a dull film", "the plot is fun"]
    probabilities = load_scorer(classifier_run).score(texts)
    rewards = load_reward(classifier_run, "positive")(["ignored"] * 3, texts)  # a classifier reads answers alone
    assert rewards == pytest.approx([math.log(p / (1 - p)) for p in probabilities], abs=1e-4)


def test_score_reads_a_causal_run_on_label_data_as_ppo_does(tmp_path, tiny_model_dir, review_data, capsys):
    from tunesmith.align.rewards import load_reward

    run_training(load_config(write_config(tmp_path / "c.yaml", tiny_model_dir, review_data, train=TRAIN)))
    capsys.readouterr()
    assert main(["score", str(tmp_path / "run"), "a great film", "a dull film"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == "# P(positive)"
    rewards = load_reward(tmp_path / "run", "positive")(["p", "p"], ["a great film", "a dull film"])
    assert _scores(captured.out) == pytest.approx([1 / (1 + math.exp(-r)) for r in rewards], abs=1e-4)


def test_score_refuses_runs_that_cannot_score_in_one_line(tmp_path, reward_run, capsys):
    import yaml

    config = yaml.safe_load((reward_run / "config.yaml").read_text())
    config["objective"] = {"name": "dpo"}
    other = tmp_path / "dpo_run"
    other.mkdir()
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    (other / "adapter").symlink_to(reward_run / "adapter")
    cli_fails(capsys, ["score", str(other), "x"], "is a dpo run, not a classifier or reward model")
    cli_fails(capsys, ["score", str(tmp_path / "none"), "x"], "no such run directory")
    (tmp_path / "empty").mkdir()
    cli_fails(capsys, ["score", str(tmp_path / "empty"), "x"], "not a tunesmith run directory")
    cli_fails(capsys, ["score", str(reward_run)], "give texts to score")


def test_the_commands_in_docs_alignment_parse():
    import shlex
    from pathlib import Path

    from tunesmith.cli import build_parser

    lines, fence = [], None  # fence: the open block's tag ("" for an untagged block), None outside
    text = (Path(__file__).parent.parent / "docs" / "alignment.md").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("```"):
            fence = line[3:] if fence is None else None
        elif fence == "" and line.startswith("tunesmith "):
            lines.append(line.split("  #")[0].strip())
    assert len(lines) >= 8
    for line in lines:
        build_parser().parse_args(shlex.split(line)[1:])
