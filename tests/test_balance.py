"""data.balance: class-balanced and square-root sampling of the training split, on the sampler seam."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import cli_fails, review_rows, write_config, write_jsonl

from tunesmith.train.balance import balance_weights, balanced_batches


def imbalanced_reviews(n: int, every: int = 7) -> list[dict]:
    """Reviews with one positive in ``every`` rows: the positives are the minority."""
    rows = review_rows(2 * n)
    negatives = [r for r in rows if r["sentiment"] == "rotten"]
    positives = [r for r in rows if r["sentiment"] == "fresh"]
    return [positives.pop() if i % every == 0 else negatives.pop() for i in range(n)]


def imbalanced_data(tmp_path, n: int = 140) -> dict:
    path = write_jsonl(tmp_path / "reviews.jsonl", imbalanced_reviews(n))
    return {"path": str(path), "format": "classification", "columns": {"text": "review", "label": "sentiment"},
            "label_map": {"fresh": "positive", "rotten": "negative"}, "instruction": "classify sentiment: {text}",
            "max_length": 64, "split": {"validation": 0.25, "test": 0.25}}


@pytest.mark.parametrize("mode, share", [("class", 0.5), ("sqrt", 1 / (1 + 3))])
def test_each_label_gets_its_share_of_the_draw(mode, share):
    labels = ["b"] * 90 + ["a"] * 10 + [None] * 20  # sqrt: 10**0.5 : 90**0.5 = 1 : 3
    weights = balance_weights(labels, mode)
    total = sum(weights)
    # Unlabelled items keep their 20 of 120; the labelled 100 are shared out by label.
    assert sum(w for w, label in zip(weights, labels) if label == "a") / total == pytest.approx(share * 100 / 120)
    assert sum(w for w, label in zip(weights, labels) if label is None) / total == pytest.approx(20 / 120)


def test_each_epoch_draws_as_many_items_balanced_and_seeded():
    from test_curriculum import ListView

    items = [{"id": i} for i in range(200)]
    labels = ["rare" if i % 10 == 0 else "common" for i in range(200)]
    batches = balanced_batches(items, ListView, labels, "class", seed=3)
    drawn = [view.tensors(rows)[0] for view, rows in batches.epoch(0)]
    assert len(drawn) == 200
    assert 0.4 < Counter(labels[i] for i in drawn)["rare"] / 200 < 0.6
    again = [view.tensors(rows)[0] for view, rows in balanced_batches(items, ListView, labels, "class", 3).epoch(0)]
    assert drawn == again  # a resumed run draws the same
    assert [view.tensors(rows)[0] for view, rows in batches.epoch(1)] != drawn
    assert sorted(batches.full.tensors(rows)[0] for _, rows in batches.epoch(-1)) == list(range(200))


def test_a_balanced_run_trains(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from tunesmith.cli import main

    data = {**imbalanced_data(tmp_path), "balance": "class"}
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data, train={"max_steps": 16, "eval_every": 8})
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert sum(losses[-4:]) < sum(losses[:4])
    lora_b = [t for name, t in load_file(run / "adapter" / "adapter_model.safetensors").items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)


def test_balance_is_checked(tmp_path, tiny_model_dir, capsys):
    data = imbalanced_data(tmp_path)
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, {**data, "balance": "classes"})
    cli_fails(capsys, ["train", str(config)], "data.balance")
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, {**data, "balance": "sqrt"},
                          train={"curriculum": {"by": "length"}})
    cli_fails(capsys, ["train", str(config)], "data.balance: sqrt and train.curriculum both choose the training rows")
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": f"plain text number {i}"} for i in range(40)])
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, {"path": str(texts), "balance": "class"})
    cli_fails(capsys, ["train", str(config)], "data.balance: class needs label data")
    assert not (tmp_path / "run").exists()
