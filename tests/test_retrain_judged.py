"""``tunesmith retrain RUN --judge JUDGE``: "better on the new data" judged on answers.

Parent and child sample answers to the held-out new prompts from the same seeds; the judge (a reward
model run) scores them; the child must have the higher mean reward, and stay within the tolerance on
the original test set by its objective's metric.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli_fails
from test_retrain_reward import TRAIN, causal_parent, rated_store, reward_run  # noqa: F401 - the fixture
from tunesmith.align.rewards import load_reward
from tunesmith.cli import main
from tunesmith.judge import Sampling, load_judge
from tunesmith.retrain.gate import JUDGED, decide
from tunesmith.config import load_config
from tunesmith.retrain.loop import judge_file
from tunesmith.session import load_run


@pytest.fixture(scope="module")
def judge_run(tmp_path_factory, tiny_model_dir):
    """A reward model of review pairs: the judge."""
    return reward_run(tmp_path_factory.mktemp("gate_judge"), tiny_model_dir, 4)


def test_the_judged_gate_promotes_on_the_judges_mean_reward_and_keeps_the_original_within_tolerance():
    parent = {"original": {"loss": 0.60}, "new": {"loss": 0.70, JUDGED: 0.10}}
    better = {"original": {"loss": 0.605}, "new": {"loss": 0.75, JUDGED: 0.30}}  # new pairs' loss worse: not read
    decision = decide(parent, better, "loss", 0.01, new_metric=JUDGED)
    assert decision.promote and decision.new_metric == JUDGED and decision.metric == "loss"
    assert (decision.parent_new, decision.child_new) == (0.10, 0.30)
    assert f"{JUDGED} 0.1000 -> 0.3000" in decision.reason and "loss 0.6000 -> 0.6050" in decision.reason
    worse_answers = {"original": {"loss": 0.50}, "new": {"loss": 0.60, JUDGED: 0.05}}
    assert not decide(parent, worse_answers, "loss", 0.01, new_metric=JUDGED).promote
    forgot = {"original": {"loss": 0.65}, "new": {"loss": 0.60, JUDGED: 0.50}}  # loss: lower is better
    refused = decide(parent, forgot, "loss", 0.01, new_metric=JUDGED)
    assert not refused.promote and "worse on the original test set" in refused.reason


def test_retrain_with_a_judge_samples_parent_and_child_on_the_held_out_prompts(causal_parent, judge_run,  # noqa: F811
                                                                                tmp_path):
    store, child = rated_store(tmp_path / "s.sqlite"), tmp_path / "dpo"
    code = main(["retrain", str(causal_parent), "--objective", "dpo", "--judge", str(judge_run),
                 "--judge-samples", "2", "--store", str(store), "--out", str(child), "--min-rows", "8",
                 "--tolerance", "10", "--log", str(tmp_path / "decisions.jsonl"), *TRAIN])
    record = json.loads((child / "retrain_decision.json").read_text())
    decision, judged = record["decision"], json.loads((child / "retrain_judged.json").read_text())
    assert decision["new_metric"] == JUDGED and decision["metric"] == "loss"
    assert judged["judge"] == str(judge_run) and judged["sampling"]["samples_per_prompt"] == 2

    # Every held-out prompt (each of its user's turns), twice, the same for both.
    held = [json.loads(line) for line in (tmp_path / "dpo.data" / "new_heldout.jsonl").read_text().splitlines()]
    prompts = sorted({row["prompt"] for row in held})
    assert judged["parent"]["prompts"] == judged["child"]["prompts"]
    assert sorted(set(judged["parent"]["prompts"])) == prompts and len(judged["parent"]["answers"]) == 2 * len(prompts)
    assert judged["sampling"]["prompts"] == len(prompts)
    for side in ("parent", "child"):
        rewards = judged[side]["rewards"]
        assert decision[f"{side}_new"] == pytest.approx(sum(rewards) / len(rewards))
        assert record[f"{side}_metrics"]["new"][JUDGED] == decision[f"{side}_new"]
        assert record[f"{side}_metrics"]["original"]["loss"] == decision[f"{side}_original"]
    # The rewards are the judge's own scores of those answers to those prompts.
    rescored = load_reward(judge_run, "positive", torch.device("cpu"))(judged["child"]["prompts"],
                                                                        judged["child"]["answers"])
    assert [float(r) for r in rescored] == pytest.approx(judged["child"]["rewards"], abs=1e-5)
    # The child trained, so some of its answers differ from the parent's on the same seeds.
    assert judged["child"]["answers"] != judged["parent"]["answers"]
    # Same seeds: the parent judged again answers the same.
    config = load_config(child / "config.yaml")
    again = judge_file(load_run(causal_parent), tmp_path / "dpo.data" / "new_heldout.jsonl", config,
                       load_judge(judge_run, "positive", torch.device("cpu")),
                       Sampling(**judged["sampling"]))
    assert again["answers"] == judged["parent"]["answers"]

    expected = decision["child_new"] > decision["parent_new"] and \
        decision["child_original"] <= decision["parent_original"] + 10
    assert decision["promote"] is expected and code == (0 if expected else 1)


def test_what_a_judge_cannot_judge_is_one_line_before_training(causal_parent, judge_run, tmp_path, capsys):  # noqa: F811
    store = rated_store(tmp_path / "s.sqlite")
    common = ["--store", str(store), "--out", str(tmp_path / "x"), "--min-rows", "8"]
    cli_fails(capsys, ["retrain", str(causal_parent), "--objective", "reward", "--judge", str(judge_run), *common],
              f"--judge {judge_run}: the judge scores sampled answers; a reward child writes none")
    cli_fails(capsys, ["retrain", str(causal_parent), "--objective", "dpo", "--judge", str(tmp_path / "nope"),
                       *common], "--judge:")
    cli_fails(capsys, ["retrain", str(causal_parent), "--objective", "dpo", "--judge", str(judge_run),
                       "--judge-samples", "0", *common], "--judge-samples 0: expected 1 or more")
    assert not (tmp_path / "x").exists()
