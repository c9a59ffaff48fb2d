"""A child that starts from its parent's tuned weights (``train --from``, ``retrain``) is trained by
dpo and kto against its parent, for every method; a fresh run against its base; a resumed child
against its parent again, not against its partly trained weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import preference_rows, unpaired_rows, write_config, write_jsonl
from tunesmith.config import load_config
from tunesmith.objectives import dpo
from tunesmith.objectives.kto import as_pair
from tunesmith.recipe import run_training
from tunesmith.session import Session, load_run
from tunesmith.store.lineage import format_chain
from tunesmith.train.precision import autocast

LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
METHODS = {"lora": LORA, "full": {"name": "full"}}
DATA = {"max_length": 64, "split": {"validation": 0.15, "test": 0.15}}


@pytest.fixture(scope="module")
def parents(tmp_path_factory, tiny_model_dir):
    """A causal run per method that imitates the chosen answers: far from the base on the pairs."""
    root = tmp_path_factory.mktemp("parents")
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(40, seed=3)]
    data = {"path": str(write_jsonl(root / "answers.jsonl", rows)), **DATA}
    runs = {}
    for name, method in METHODS.items():
        config = write_config(root / f"{name}.yaml", tiny_model_dir, data, method=method,
                              train={"max_steps": 8, "eval_every": 8, "lr": 0.05 if name == "lora" else 0.002},
                              output={"dir": str(root / name)})
        run_training(load_config(config))
        runs[name] = root / name
    return runs


def _child(tmp_path, model_dir, objective: str, method: str, name: str = "child", **train):
    rows = preference_rows(24) if objective == "dpo" else unpaired_rows(24)
    data = {"path": str(write_jsonl(tmp_path / "rows.jsonl", rows)), **DATA}
    return load_config(write_config(tmp_path / f"{name}.yaml", model_dir, data, objective={"name": objective},
                                    method=METHODS[method],
                                    train={"max_steps": 4, "eval_every": 4, "lr": 0.02, **train},
                                    output={"dir": str(tmp_path / name)}))


@pytest.fixture
def started(monkeypatch):
    """Every policy whose reference ``start_from`` fixed, as the run left it."""
    policies = []
    original = dpo.Policy.start_from

    def start_from(self, model, reload, start):
        original(self, model, reload, start)
        policies.append(self)

    monkeypatch.setattr(dpo.Policy, "start_from", start_from)
    return policies


@torch.no_grad()
def _logps(model, config, pairs: list[dict]) -> torch.Tensor:
    """The pairs' answers' log-probabilities under ``model``, under the autocast the run trained with."""
    view = dpo.PairBatches(pairs, Session(config).layout, reference=None)
    with autocast(config.train.mixed_precision, torch.device("cpu")):
        return dpo.pair_logps(model.eval(), view.tensors(list(range(len(pairs))))).float()


def _pairs(config, objective: str) -> list[dict]:
    session = Session(config)
    items = session.prepare().encoded["train"][:4]
    return items if objective == "dpo" else [as_pair(i) for i in items]


@pytest.mark.parametrize("objective, method", [("dpo", "lora"), ("dpo", "full"), ("kto", "lora")])
def test_a_child_is_trained_against_its_parent_not_the_base(tmp_path, tiny_model_dir, parents, started,
                                                            objective, method):
    config = _child(tmp_path, tiny_model_dir, objective, method)
    run_training(config, parent=parents[method])
    [policy] = started
    pairs = _pairs(config, objective)
    reference = torch.stack([policy.reference.logps[dpo._key(p)] for p in pairs]).float()
    parent = _logps(load_run(parents[method])[2], config, pairs)
    base = _logps(Session(config).load_model([]), config, pairs)
    assert (parent - base).abs().mean() > 1.0  # the parent learned: the two references differ
    torch.testing.assert_close(reference, parent, rtol=0.02, atol=0.05)
    metrics = json.loads((tmp_path / "child" / "metrics.json").read_text())
    assert metrics["reference"] == f"parent {parents[method].resolve()}"
    assert "the model training started from" in (tmp_path / "child" / "report.md").read_text()
    assert f"objective {objective}, reference parent {parents[method].resolve()}" in format_chain(tmp_path / "child")


def test_a_fresh_run_is_trained_against_its_base(tmp_path, tiny_model_dir, started):
    config = _child(tmp_path, tiny_model_dir, "dpo", "lora")
    run_training(config)
    assert not started  # the base is the adapter disabled
    assert json.loads((tmp_path / "child" / "metrics.json").read_text())["reference"] == "base"


def test_a_resumed_child_keeps_its_parents_reference(tmp_path, tiny_model_dir, parents, started):
    def run(name: str, interrupt_at: int | None = None) -> dict:
        config = _child(tmp_path, tiny_model_dir, "dpo", "lora", name, max_steps=6, save_every=100)

        def stop(state):
            if state.step == interrupt_at:
                raise KeyboardInterrupt

        if interrupt_at:
            with pytest.raises(KeyboardInterrupt):
                run_training(config, parent=parents["lora"], on_step=stop)
            run_training(config, resume=True)  # the parent from the run's status
        else:
            run_training(config, parent=parents["lora"])
        return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")

    straight = run("straight")
    resumed = run("resumed", interrupt_at=3)
    assert len(started) == 3
    # The resumed run's reference was scored by the parent again, not by the weights of step 3.
    assert {k: v.tolist() for k, v in started[2].reference.logps.items()} == \
        {k: v.tolist() for k, v in started[0].reference.logps.items()}
    assert started[2].reference.start == f"parent {parents['lora'].resolve()}"
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
