"""``tunesmith retrain RUN --objective reward``: a reward model of a served run's rated answers.

The ratings of a causal run's answers give preference pairs (thumbs up over thumbs down on one
prompt, as for dpo). The reward child has a scalar head, which the causal parent's adapter does not
fit: it starts from the base, and, with no reward model before it to beat, is gated on its pairwise
accuracy on the held-out new pairs against chance. A reward child of a reward run continues it and is
gated against it, on the new pairs and on the parent's own test pairs.
"""

from __future__ import annotations

import json
import random

import pytest
from safetensors.torch import load_file

from conftest import NEGATIVE, NOUNS, POSITIVE, cli_fails, preference_rows, write_config, write_jsonl
from tunesmith.cli import main
from tunesmith.store import Run, db

SERVED = "served"


@pytest.fixture(scope="module")
def causal_parent(tmp_path_factory, tiny_model_dir):
    """A causal run that imitates answers to review prompts."""
    root = tmp_path_factory.mktemp("reward_child")
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(40)]
    data = {"path": str(write_jsonl(root / "answers.jsonl", rows)), "max_length": 64,
            "split": {"validation": 0.15, "test": 0.15}}
    config = write_config(root / "c.yaml", tiny_model_dir, data,
                          train={"max_steps": 2, "eval_every": 2, "mixed_precision": "no"}, eval={"samples": 0},
                          output={"dir": str(root / SERVED)})
    assert main(["train", str(config)]) == 0
    return root / SERVED


def rated_store(path, prompts: int = 20, seed: int = 7):
    """Answers served under ``SERVED``, two liked (a positive word) and two not (a negative one) per
    prompt: each prompt gives four pairs, learnable from the adjective alone."""
    rng = random.Random(seed)
    store = db.connect(path)
    for i in range(prompts):
        prompt = "review " + " ".join(rng.sample(NOUNS, 3)) + f" {i}"
        noun = rng.choice(NOUNS)
        for words, score in ((POSITIVE, 1.0), (NEGATIVE, 0.0)):
            for word in rng.sample(words, 2):
                answer = db.add_answer(store, source="served", run=SERVED, prompt=prompt, answer=f"the {noun} is {word}")
                db.add_rating(store, answer, rater="k", score=score)
    store.close()
    return path


TRAIN = ["--set", "train.max_steps=24", "--set", "train.lr=0.01", "--set", "train.eval_every=12",
         "--set", "train.mixed_precision=no"]


def test_a_reward_child_of_a_causal_run_starts_from_the_base_and_beats_chance(causal_parent, tmp_path):
    store, child = rated_store(tmp_path / "s.sqlite"), tmp_path / "reward"
    code = main(["retrain", str(causal_parent), "--objective", "reward", "--store", str(store), "--out", str(child),
                 "--min-rows", "8", "--log", str(tmp_path / "decisions.jsonl"), *TRAIN])
    record = json.loads((child / "retrain_decision.json").read_text())
    assert record["objective"] == "reward" and record["data_kind"] == "preference"
    assert record["started_from"] == "base" and record["replay_rows"] == 0  # a causal parent has no pairs
    assert record["rated_rows"] == 80 and record["original_test_rows"] == 0
    pairs = [json.loads(line) for line in (tmp_path / "reward.data" / "train.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"].split()[-1] in POSITIVE and p["rejected"].split()[-1] in NEGATIVE for p in pairs)

    decision = record["decision"]
    assert decision["against"] == "chance" and decision["metric"] == "accuracy" and decision["parent_new"] == 0.5
    assert record["parent_metrics"] is None and set(record["child_metrics"]) == {"new"}
    assert decision["child_new"] == record["child_metrics"]["new"]["accuracy"]
    assert decision["promote"] and code == 0, decision["reason"]
    assert decision["child_new"] > 0.5

    # It trained: a new run of its own (no lineage to the causal run), its loss down, its adapter moved.
    metrics = json.loads((child / "metrics.json").read_text())
    assert metrics["objective"] == "reward" and metrics["tuned"]["loss"] < metrics["base"]["loss"]
    assert Run(child).parent is None
    lora_b = [t for n, t in load_file(child / "adapter" / "adapter_model.safetensors").items() if "lora_B" in n]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at 0


def reward_run(root, tiny_model_dir, steps: int):
    """A reward model of 30 review pairs (6 held out for its test), trained for ``steps`` steps in ``root/judge``."""
    data = {"path": str(write_jsonl(root / "pairs.jsonl", preference_rows(30))), "max_length": 64,
            "split": {"validation": 0.15, "test": 0.2}}
    config = write_config(root / "c.yaml", tiny_model_dir, data, objective={"name": "reward"},
                          train={"max_steps": steps, "eval_every": steps, "mixed_precision": "no"},
                          eval={"samples": 0}, output={"dir": str(root / "judge")})
    assert main(["train", str(config)]) == 0
    return root / "judge"


def test_a_reward_child_of_a_reward_run_continues_it_and_is_gated_against_it(tmp_path, tiny_model_dir):
    reward_run(tmp_path, tiny_model_dir, 2)
    store, child = rated_store(tmp_path / "s.sqlite"), tmp_path / "judge2"
    code = main(["retrain", str(tmp_path / "judge"), "--adapter", SERVED, "--store", str(store), "--out", str(child),
                 "--min-rows", "8", "--tolerance", "1.0", "--log", str(tmp_path / "decisions.jsonl"), *TRAIN])
    record = json.loads((child / "retrain_decision.json").read_text())
    assert record["objective"] == "reward" and record["started_from"] == "parent"
    assert record["replay_rows"] > 0 and record["original_test_rows"] == 6  # the parent's own pairs
    decision = record["decision"]
    assert decision["against"] == "parent" and decision["metric"] == "accuracy"
    for who in ("parent", "child"):
        assert set(record[f"{who}_metrics"]) == {"original", "new"}
        assert record[f"{who}_metrics"]["original"]["accuracy"] == decision[f"{who}_original"]
    expected = decision["child_new"] > decision["parent_new"] and decision["child_original"] >= \
        decision["parent_original"] - 1.0
    assert decision["promote"] is expected and code == (0 if expected else 1)
    assert Run(child).parent == (tmp_path / "judge").resolve()


def test_what_a_reward_child_cannot_be_is_one_line(causal_parent, tmp_path, capsys):
    store = rated_store(tmp_path / "s.sqlite")
    cli_fails(capsys, ["retrain", str(causal_parent), "--objective", "reward", "--store", str(store),
                       "--alias", "live", "--out", str(tmp_path / "x")],
              "--alias live: objective reward lacks the ability causal_answers")
    cli_fails(capsys, ["retrain", str(causal_parent), "--objective", "classification", "--store", str(store),
                       "--out", str(tmp_path / "x")], "objective classification lacks the ability scores_rewards")
    assert not (tmp_path / "x").exists()
