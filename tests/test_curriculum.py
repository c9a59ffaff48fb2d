"""Curriculum (train.curriculum): the pacing schedule, easy-first drawing, base-model losses against
a slow reference, and a tiny run that trains with it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import random_examples, write_config

from tunesmith.train.options import CurriculumConfig


def test_pacing_grows_from_start_to_all_at_until():
    from tunesmith.train.curriculum import pace

    linear = CurriculumConfig(by="length", start=0.2, until=0.5)
    assert [pace(linear, t) for t in (0, 0.25, 0.5, 0.9)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    root = CurriculumConfig(by="length", pacing="root", start=0.2, until=0.5)
    assert pace(root, 0.125) == pytest.approx(0.2 + 0.8 * 0.5)  # sqrt(1/4): faster than linear at first
    assert all(pace(root, t) >= pace(linear, t) for t in (0.05, 0.1, 0.3))


class ListView:
    """The least a Batches needs for planning: one micro-batch per item, in a seeded order."""

    def __init__(self, items):
        self.items = items

    def epoch(self, epoch):
        import random

        order = list(range(len(self.items)))
        random.Random(epoch).shuffle(order)
        return [[i] for i in order]

    def tensors(self, rows):
        return [self.items[i]["id"] for i in rows]


def test_each_stage_draws_from_the_easiest_pool_the_pacing_allows():
    from tunesmith.train.curriculum import CurriculumBatches, pace

    n = 100
    items = [{"id": i} for i in range(n)]
    scores = [float(n - i) for i in range(n)]  # item 99 is the easiest
    cfg = CurriculumConfig(by="length", start=0.1, until=0.5, stages=10)
    batches = CurriculumBatches(items, ListView, scores, cfg, seed=0, epochs_planned=2)
    rank = {i: r for r, i in enumerate(sorted(range(n), key=lambda i: scores[i]))}
    for epoch in (0, 1):
        stages = batches.draw(epoch)
        assert sum(len(s) for s in stages) == n
        for k, stage in enumerate(stages):
            allowed = math.ceil(pace(cfg, (epoch + k / 10) / 2) * n)
            assert max(rank[i] for i in stage) < allowed
    first = batches.draw(0)
    assert max(rank[i] for i in first[0]) < 10 and max(rank[i] for i in first[-1]) >= 50
    # From the first epoch's middle on (until 0.5 of 2 epochs) the pool is everything, and an epoch
    # draws every item once.
    assert sorted(i for stage in batches.draw(1) for i in stage) == list(range(n))
    # The plan holds every drawn item as a micro-batch, laid out by its stage's view, in stage order.
    plan = batches.epoch(0)
    assert len(plan) == n
    assert {batches.tensors(e)[0] for e in plan[:10]} == set(first[0])
    assert batches.draw(0) == first  # seeded: a resumed run draws the same


def test_base_loss_scores_match_a_slow_per_example_reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.data.format import IGNORE
    from tunesmith.objectives.base import Layout
    from tunesmith.objectives.causal import PackedBatches
    from tunesmith.train.curriculum import loss_scores

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    items = random_examples(12, vocab=300)
    fast = loss_scores(model, PackedBatches(items, Layout(128, 32, pad_id=0, seed=0)))
    slow = []
    with torch.no_grad():
        for item in items:
            logits = model(torch.tensor([item["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(item["labels"][1:])
            slow.append(float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE)))
    assert fast == pytest.approx(slow, rel=1e-4)


def test_a_run_with_a_base_loss_curriculum_trains_and_caches_its_scores(tmp_path, tiny_model_dir, review_data, capsys):
    from safetensors.torch import load_file

    from tunesmith.cli import main

    config = write_config(tmp_path / "c.yaml", tiny_model_dir, review_data,
                          train={"max_steps": 20, "curriculum": {"by": "base_loss", "start": 0.3, "until": 0.5,
                                                                 "stages": 4}})
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    scores = json.loads((run / "curriculum_scores.json").read_text())
    assert len(scores) == json.loads((run / "data_stats.json").read_text())["rows"]["train"]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert sum(losses[-5:]) < sum(losses[:5])
    lora_b = [t for name, t in load_file(run / "adapter" / "adapter_model.safetensors").items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)


def test_curriculum_is_refused_with_privacy(tmp_path, tiny_model_dir, review_data, capsys):
    from conftest import cli_fails

    config = write_config(tmp_path / "c.yaml", tiny_model_dir, review_data,
                          train={"packing": False, "curriculum": {"by": "length"}},
                          privacy={"noise_multiplier": 1.0, "expected_batch_size": 8})
    cli_fails(capsys, ["train", str(config)], "train.curriculum: not with privacy")
