"""The reference-free preference losses (SimPO, ORPO): each against a slow reference, and a run that
learns with no reference model ever asked for."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_config
from tunesmith.config import load_config
from tunesmith.objectives import dpo
from tunesmith.objectives.dpo import Options
from tunesmith.objectives.preference_losses import REFERENCE_FREE
from tunesmith.recipe import run_training


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _slow(name: str, chosen: float, rejected: float, chosen_tokens: float, rejected_tokens: float,
          beta: float, gamma: float) -> float:
    a, b = chosen / chosen_tokens, rejected / rejected_tokens
    if name == "simpo":  # Meng et al. 2024, eq. 6
        return -_log_sigmoid(beta * a - beta * b - gamma)
    # ORPO (Hong et al. 2024, eq. 4 to 7): the SFT loss plus beta times the odds-ratio loss.
    pa, pb = math.exp(a), math.exp(b)
    odds_ratio = math.log((pa / (1 - pa)) / (pb / (1 - pb)))
    return -a - beta * _log_sigmoid(odds_ratio)


@pytest.mark.parametrize("name", list(REFERENCE_FREE))
def test_each_reference_free_loss_matches_a_slow_reference(name):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 40, (2, 16), generator=g).double()
    logps = -torch.rand(2, 16, generator=g, dtype=torch.float64) * 3 * tokens  # mean log-probs -3..0
    got = REFERENCE_FREE[name](logps[0], logps[1], tokens[0], tokens[1], beta=0.7, gamma=0.3)
    want = [_slow(name, *logps[:, i].tolist(), *tokens[:, i].tolist(), 0.7, 0.3) for i in range(16)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_simpo_normalises_by_length_and_orpo_adds_the_sft_loss():
    short, long = torch.tensor([-2.0]), torch.tensor([-20.0])  # the same mean: -1 a token
    one, ten = torch.tensor([2.0]), torch.tensor([20.0])
    # Same per-token log-probability: no preference either way, whatever the lengths.
    torch.testing.assert_close(REFERENCE_FREE["simpo"](short, long, one, ten, beta=2.0, gamma=0.0),
                               torch.tensor([math.log(2)]))
    # ORPO with no odds-ratio weight is the chosen answer's mean negative log-likelihood.
    torch.testing.assert_close(REFERENCE_FREE["orpo"](short, long, one, ten, beta=0.0), torch.tensor([1.0]))


def test_simpo_takes_its_own_default_beta_unless_one_is_given():
    assert Options(loss="simpo").beta == 2.0 and Options(loss="simpo", beta=2.5).beta == 2.5
    assert Options().beta == 0.1 and Options(loss="orpo").beta == 0.1
    assert Options(loss="orpo").reference_free and not Options(loss="ipo").reference_free


@pytest.mark.parametrize("loss", list(REFERENCE_FREE))
def test_a_reference_free_run_learns_with_no_reference(tmp_path, tiny_model_dir, preference_data, monkeypatch,
                                                       loss):
    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free loss asked for the reference")

    monkeypatch.setattr(dpo, "reference_logps", no_reference)
    path = write_config(tmp_path / "c.yaml", tiny_model_dir, preference_data, objective={"name": "dpo", "loss": loss},
                        method={"name": "lora", "r": 8, "alpha": 16},
                        train={"max_steps": 12, "lr": 0.01, "eval_every": 6, "mixed_precision": "no"})
    run_training(load_config(path))
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]
    assert metrics["tuned"]["reward_margin"] > metrics["base"]["reward_margin"]
    assert {"chosen_logp", "rejected_logp"} <= set(metrics["tuned"])
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]  # they start at zero
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "the adapter must have trained"
