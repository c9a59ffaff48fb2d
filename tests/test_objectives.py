"""Every objective, one row each, on a tiny model: its protocol contract, a short training run, and
every command that reads a run (eval, generate, data inspect).

Adding an objective: its module under objectives/, its line in objectives.REGISTRY, a row here
(tests/test_objective_abilities.py registers a throwaway one that way).
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_config
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.eval.metrics import METRICS
from tunesmith.evaluate import evaluate_run
from tunesmith.objectives import REGISTRY
from tunesmith.objectives.base import Batches, Objective
from tunesmith.recipe import run_training
from tunesmith.session import Session, load_run

# objective -> (model fixture, learning rate[, data fixture: review_data unless named])
CASES = {
    "causal": ("tiny_model_dir", 0.05),
    "classification": ("tiny_bert_dir", 0.05),
    "seq2seq": ("tiny_t5_dir", 0.02),
    "dpo": ("tiny_model_dir", 0.01, "preference_data"),
    "reward": ("tiny_model_dir", 0.05, "preference_data"),
    "kto": ("tiny_model_dir", 0.02, "unpaired_data"),
}


def test_every_objective_has_a_row():
    assert set(CASES) == set(REGISTRY)


@pytest.fixture(params=list(CASES))
def case(request, tmp_path):
    name = request.param
    fixture, lr, *data = CASES[name]
    path = write_config(tmp_path / "c.yaml", request.getfixturevalue(fixture),
                        request.getfixturevalue(data[0] if data else "review_data"),
                        objective={"name": name}, method={"name": "lora", "r": 8, "alpha": 16},
                        train={"max_steps": 12, "lr": lr, "eval_every": 6, "mixed_precision": "no"})
    return name, path


def test_objective_follows_the_protocols_and_per_example_losses_add_up(case):
    name, path = case
    session = Session(load_config(path))
    assert isinstance(session.objective, Objective) and session.objective.name == name
    data = session.prepare()
    batches = session.objective.batches(data.encoded["train"])
    assert isinstance(batches, Batches)
    model = session.load_model(data.labels)
    model = session.method.apply(model, session.config.method)
    batch = batches.tensors(batches.epoch(0)[0])
    index, sums, counts = batches.example_losses(model, batch)
    total = batches.loss(model, batch)
    torch.testing.assert_close(sums.sum(), total, rtol=1e-5, atol=1e-5)
    assert int(counts.sum()) == batches.trained_tokens(batch) and len(set(index.tolist())) == len(index)
    # Each example's loss keeps its own gradient (what per-example clipping needs).
    sums[0].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_objective_trains_and_every_command_reads_its_run(case, tmp_path, capsys):
    name, path = case
    run_training(load_config(path))
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["objective"] == name and metrics["tuned"]["loss"] < metrics["base"]["loss"]
    assert metrics["tuned"]["accuracy"] >= 0  # label data: every objective scores labels
    # The metrics an objective declares are the ones of the shared table that its evaluation returns.
    assert {k for k in metrics["tuned"] if k in METRICS} == set(REGISTRY[name].abilities.metrics)

    _, _, model = load_run(run)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]  # they start at zero
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "the adapter must have trained"

    _, tuned = evaluate_run(run)
    assert tuned["loss"] == pytest.approx(metrics["tuned"]["loss"], abs=1e-5)
    capsys.readouterr()
    assert main(["generate", str(run), "a brilliant film", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["data", "inspect", str(path)]) == 0
    assert "rows kept: train" in capsys.readouterr().out
