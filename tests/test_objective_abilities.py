"""Objectives declare what they can do, and nothing outside ``objectives/`` asks their names.

Adding an objective is one module, one registry line and one test row: two throwaway objectives
(tests/throwaway_objective.py), registered by a child process exactly as a user would register
theirs, train, are served where their head allows, and are listed with their metrics.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import preference_rows, write_config, write_jsonl
from tunesmith.eval.metrics import METRICS
from tunesmith.objectives import HEADS, REGISTRY, lacks

TESTS = Path(__file__).parent
# A user's program: the objectives' module, one registry line each, then the ordinary CLI, or the
# server on one run (its models, an answer, and what it says of a run it cannot serve).
RUNNER = f"""
import json, sys
sys.path.insert(0, {str(TESTS)!r})
from tunesmith import objectives
from throwaway_objective import Critic, Imitate
objectives.REGISTRY["imitate"] = Imitate
objectives.REGISTRY["critic"] = Critic
if sys.argv[1] != "serve":
    from tunesmith.cli import main
    sys.exit(main(sys.argv[1:]))
import httpx
from tunesmith.errors import TunesmithError
from tunesmith.serve.adapters import read_run
from tunesmith.serve.server import build_server
try:
    read_run(sys.argv[3])
except TunesmithError as e:
    refused = str(e)
server = build_server({{"imitate": sys.argv[2]}}, log_requests=False)
with server.in_thread() as url:
    models = [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
    answer = httpx.post(url + "/v1/completions", json={{"model": "imitate", "prompt": "a film", "max_tokens": 4,
                        "temperature": 0}}, timeout=60).json()["choices"][0]["text"]
print(json.dumps({{"models": models, "answer": answer, "refused": refused}}))
"""


def _user_program(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, *argv], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_objective_declares_a_head_known_metrics_and_data(name):
    abilities = REGISTRY[name].abilities
    assert abilities.head in HEADS
    assert abilities.metrics and set(abilities.metrics) <= set(METRICS) and "loss" in abilities.metrics
    assert abilities.data
    assert abilities.scores in (None, "label", "reward")
    assert abilities.gate_metric in abilities.metrics  # what retrain's gate compares


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_objective_has_the_methods_its_abilities_promise(name):
    cls, can = REGISTRY[name], REGISTRY[name].abilities
    assert can.batched_answers == hasattr(cls, "answers")
    assert can.scores_labels == (hasattr(cls, "label_scores") and hasattr(cls, "encode"))
    if can.loss_scored and "classification" in can.data and not can.scores_labels:
        assert hasattr(cls, "choices")  # the labels it writes are scored (``Session._scored``)


def test_nothing_outside_objectives_asks_an_objective_for_a_method_or_its_name():
    # Nor a model whether its method disables an adapter: that is ``Method.disables``.
    package = TESTS.parent / "src" / "tunesmith"
    asked = re.compile(r"hasattr\([^)]*(objective|disable_adapter)|objective\.name (==|!=|in) [\"'(\[]")
    found = [f"{path.relative_to(package)}:{n}: {line.strip()}"
             for path in package.rglob("*.py") if "objectives" not in path.parts
             for n, line in enumerate(path.read_text().splitlines(), 1) if asked.search(line)]
    assert not found, found


def test_a_decision_rule_needs_an_objective_that_scores_labels(tmp_path, tiny_model_dir, capsys):
    from conftest import cli_fails

    rows = [{"prompt": f"review {r['prompt']}", "completion": r["chosen"]} for r in preference_rows(20)]
    data = {"path": str(write_jsonl(tmp_path / "answers.jsonl", rows))}
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data, objective={"name": "seq2seq"},
                          eval={"decision": "prior"})
    cli_fails(capsys, ["train", str(config)], "eval.decision: objective seq2seq lacks the ability scores_labels",
              "(objectives that have it: causal, classification)")


def test_a_missing_ability_is_one_line_naming_it():
    assert lacks("dpo", "causal_answers") is None
    why = lacks("reward", "causal_answers")
    assert why.startswith("objective reward lacks the ability causal_answers: ") and "\n" not in why
    assert "(objectives that have it: causal, dpo, kto)" in why


def test_a_registered_objective_trains_is_served_where_its_head_allows_and_is_listed(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"review {r['prompt']}", "completion": r["chosen"]} for r in preference_rows(60)]
    data = {"path": str(write_jsonl(tmp_path / "answers.jsonl", rows)), "max_length": 64,
            "split": {"validation": 0.15, "test": 0.15}}
    config = write_config(tmp_path / "imitate.yaml", tiny_model_dir, data, objective={"name": "imitate"},
                          train={"max_steps": 12, "eval_every": 6, "mixed_precision": "no"},
                          output={"dir": str(tmp_path / "imitate")})
    trained = _user_program("train", str(config))
    assert trained.returncode == 0, trained.stderr
    run = tmp_path / "imitate"
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["objective"] == "imitate" and metrics["tuned"]["loss"] < metrics["base"]["loss"]
    assert {k for k in metrics["tuned"] if k in METRICS} == {"loss", "perplexity"}  # what it declared
    from safetensors.torch import load_file

    lora_b = [t for n, t in load_file(run / "adapter" / "adapter_model.safetensors").items() if "lora_B" in n]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b), "the adapter must have trained"  # B starts at 0

    # A critic has a scalar head: a config naming it is a run serve must refuse, with the ability missing.
    critic = tmp_path / "critic"
    critic.mkdir()
    critic_config = yaml.safe_load(config.read_text()) | {"objective": {"name": "critic"}}
    (critic / "config.yaml").write_text(yaml.safe_dump(critic_config))
    served = _user_program("serve", str(run), str(critic))
    assert served.returncode == 0, served.stderr
    out = json.loads(served.stdout.strip().splitlines()[-1])
    assert "imitate" in out["models"] and out["answer"]
    assert "objective critic lacks the ability causal_answers" in out["refused"]
    assert "(objectives that have it: causal, dpo, kto, imitate)" in out["refused"]

    listed = _user_program("objectives")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in listed.stdout.splitlines()}
    assert "| causal_lm |" in rows["imitate"] and "loss↓ perplexity↓" in rows["imitate"]
    assert "| reward |" in rows["critic"] and "loss↓ accuracy↑" in rows["critic"]
    # What the module touched: nothing of the package; in this process the registry is as shipped.
    assert "imitate" not in REGISTRY and "critic" not in REGISTRY
