"""Task types on tiny models: a classification head (encoder and decoder) and T5-style seq2seq."""

from __future__ import annotations

import json

import pytest

from conftest import review_rows, write_config, write_jsonl
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import evaluate_run
from tunesmith.recipe import run_training
from tunesmith.data.batching import length_grouped


def _losses(run):
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in log if "loss" in r]


# Steps and learning rates that learn under bf16 autocast as well as in float32 (the tiny encoder
# with LoRA at 60 steps of lr 0.03 did not, on a CPU with native bf16).
@pytest.mark.parametrize("model_fixture,method,steps,lr", [("tiny_bert_dir", "lora", 150, 0.01),
                                                           ("tiny_bert_dir", "full", 60, 0.001),
                                                           ("tiny_model_dir", "lora", 60, 0.03)])
def test_classification_head_learns(request, tmp_path, review_data, model_fixture, method, steps, lr):
    # The adjective comes first: a tiny random encoder pools its first token, and should not need
    # hundreds of steps to learn to route the signal there.
    rows = [{**r, "review": r["review"].split(" is ")[1].split(",")[0] + " " + r["review"]} for r in review_rows(120)]
    review_data = {**review_data, "path": str(write_jsonl(tmp_path / "first.jsonl", rows))}
    model_dir = request.getfixturevalue(model_fixture)
    config = load_config(write_config(tmp_path / "c.yaml", model_dir, review_data,
                                      model={"task": "classification"}, method={"name": method},
                                      train={"max_steps": steps, "lr": lr}))
    run_training(config)
    run = tmp_path / "run"
    losses = _losses(run)
    third = len(losses) // 3  # batches of a few examples make single steps noisy
    assert sum(losses[-third:]) < 0.8 * sum(losses[:third])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tuned"]["accuracy"] >= metrics["base"]["accuracy"] + 0.15
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]
    base, tuned = evaluate_run(run)
    assert tuned["accuracy"] == pytest.approx(metrics["tuned"]["accuracy"])


def test_seq2seq_learns_and_scores_labels(tmp_path, tiny_t5_dir, review_data):
    config = load_config(write_config(tmp_path / "c.yaml", tiny_t5_dir, review_data, model={"task": "seq2seq"},
                                      method={"name": "lora", "r": 8, "alpha": 16},
                                      train={"max_steps": 30, "lr": 0.02}))
    run_training(config)
    losses = _losses(tmp_path / "run")
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"loss", "perplexity", "accuracy", "macro_f1"} <= set(metrics["tuned"])
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]


def test_classification_needs_label_data(tmp_path, tiny_bert_dir):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q {i}", "completion": "a"} for i in range(20)])
    config = load_config(write_config(tmp_path / "c.yaml", tiny_bert_dir, {"path": str(path)},
                                      model={"task": "classification"}))
    with pytest.raises(TunesmithError, match="needs text/label data"):
        run_training(config)


def test_length_grouped_batches_cover_everything_within_budget():
    lengths = [5, 50, 7, 48, 6, 49, 3]
    batches = length_grouped(lengths, 100, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(max(lengths[i] for i in b) * len(b) <= 100 or len(b) == 1 for b in batches)


def test_eval_on_a_file_with_some_of_the_labels_scores_them_by_the_runs_labels(tmp_path, tiny_bert_dir, review_data):
    """A file holding only the run's second label is encoded by the run's label order, not its own."""
    import torch
    import torch.nn.functional as F

    from tunesmith.session import load_run

    config = load_config(write_config(tmp_path / "c.yaml", tiny_bert_dir, review_data,
                                      model={"task": "classification"}, train={"max_steps": 2}))
    run_training(config)
    run_dir = tmp_path / "run"
    rows = [r for r in review_rows(40, seed=7) if r["sentiment"] == "fresh"]
    only_positive = write_jsonl(tmp_path / "positive.jsonl", rows)
    _, tuned = evaluate_run(run_dir, str(only_positive))
    # The slow way: each row through the tuned head, against "positive"'s place among the run's labels.
    run, session, model = load_run(run_dir)
    labels = run.labels()
    assert labels == ["negative", "positive"]
    logits = session.objective.label_logits(model, [r["review"] for r in rows], labels)
    target = torch.full((len(rows),), labels.index("positive"))
    assert tuned["loss"] == pytest.approx(float(F.cross_entropy(logits, target)), abs=1e-4)
    assert tuned["accuracy"] == pytest.approx(float((logits.argmax(1) == target).float().mean()))


def test_label_order_is_the_runs_and_refuses_labels_it_lacks():
    from tunesmith.data.pipeline import label_order

    splits = {"train": [{"label": "positive"}, {"text": "a canary"}], "validation": [], "test": [{"label": "positive"}]}
    assert label_order(splits) == ["positive"]  # a new run: the training split's labels
    assert label_order(splits, ["negative", "positive"]) == ["negative", "positive"]
    splits["test"].append({"label": "meh"})
    with pytest.raises(TunesmithError, match="label 'meh' is not a label of the run"):
        label_order(splits, ["negative", "positive"])
