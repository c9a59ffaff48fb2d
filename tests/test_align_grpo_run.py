"""GRPO end to end on tiny models: a verifiable reward rises with the loss logged and every trainable
parameter changed, the variants run, checkpoint + SIGTERM + resume gives the metrics of a run never
stopped, and the run's files and commands are those of an alignment run."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml
from conftest import cli_fails, review_rows, write_jsonl

from tunesmith.align.grpo_recipe import run_grpo
from tunesmith.align.options import load_grpo_config
from tunesmith.store import Run

LETTER_E = {"name": "function", "function": "test_align_grpo_run:letter_e"}


def letter_e(prompt: str, answer: str, row: dict) -> float:
    """A verifiable reward that a tiny random model can learn within a few steps: how often 'e' appears."""
    return float(answer.count("e"))


def grpo_config(tmp_path: Path, model_dir: Path, name: str = "run", **grpo) -> dict:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", review_rows(40))
    return {
        "model": {"name": str(model_dir)},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 16, "lr": 0.03, "warmup_ratio": 0.0, "scheduler": "constant", "save_every": 4},
        "output": {"dir": str(tmp_path / name)},
        "grpo": {"prompts": str(prompts), "prompt_column": "review", "eval_prompts": 8, "prompts_per_step": 4,
                 "samples_per_prompt": 4, "max_new_tokens": 8, "num_iterations": 2, "minibatch_size": 8,
                 "rewards": [LETTER_E], **grpo},
    }


def _load(tmp_path: Path, raw: dict):
    return load_grpo_config(tmp_path / "grpo.yaml", raw=raw)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_a_verifiable_reward_logs_the_loss_and_trains_every_adapter_weight(tmp_path, tiny_model_dir,
                                                                                       monkeypatch):
    import torch

    from tunesmith.align import grpo_recipe

    start = {}
    make_optimizer = grpo_recipe.make_optimizer

    def remember_the_start(model, train):
        start.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return make_optimizer(model, train)

    monkeypatch.setattr(grpo_recipe, "make_optimizer", remember_the_start)
    report = run_grpo(_load(tmp_path, grpo_config(tmp_path, tiny_model_dir)))
    run_dir = tmp_path / "run"
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert all(isinstance(r["loss"], float) and r["loss"] == r["loss"] for r in rows)
    assert all(r["reward_function"] == r["reward"] for r in rows)  # one reward, of weight 1
    # LoRA's B matrices start at 0, so the first steps barely move the answers; then the reward rises.
    first, last = sum(r["reward"] for r in rows[:3]) / 3, sum(r["reward"] for r in rows[-3:]) / 3
    assert last > first + 1.5, (first, last)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["tuned"]["mean_reward"] > summary["base"]["mean_reward"]
    assert summary["tuned"]["kl"] > 0 and summary["base"]["kl"] == pytest.approx(0, abs=1e-4)
    assert summary["tuned"]["reward_means"] == {"function": pytest.approx(summary["tuned"]["mean_reward"])}
    # Every trainable weight moved from where it started (LoRA's B matrices start at 0, its A at random).
    trained = dict(grpo_recipe_model(run_dir).named_parameters())
    assert start and all(not torch.allclose(trained[n], p) for n, p in start.items()), \
        [n for n, p in start.items() if torch.allclose(trained[n], p)]
    assert Run(run_dir).status() == "complete" and Run(run_dir).alignment() == "grpo"
    text = report.read_text()
    assert "GRPO run" in text and "`function` (mean score)" in text and (run_dir / "curves.png").is_file()


def grpo_recipe_model(run_dir: Path):
    """The saved policy: the adapter of the run on its base, as PEFT loads it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = load_grpo_config(run_dir / "config.yaml")
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config.model.name), run_dir / "adapter")


@pytest.mark.parametrize("variant", [
    {"loss_type": "grpo", "importance": "sequence", "beta": 0.05, "num_iterations": 2, "minibatch_size": 8},
    {"loss_type": "dr_grpo", "scale_rewards": False, "mask_truncated": True, "clip_high": 0.28},
], ids=["gspo_kl_two_iterations", "dr_grpo_masked"])
def test_each_variant_runs_and_logs_what_it_adds(tmp_path, tiny_model_dir, variant):
    raw = grpo_config(tmp_path, tiny_model_dir, **variant)
    raw["train"]["max_steps"] = 2
    run_grpo(_load(tmp_path, raw))
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 2
    if variant.get("beta"):
        assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout's policy is the reference
        assert rows[1]["kl"] != 0 and "kl_k3" in rows[0]
    else:
        assert "kl" not in rows[0]  # no reference pass when beta is 0


def test_rewards_are_summed_with_their_weights_and_logged_each(tmp_path, tiny_model_dir):
    rewards = [LETTER_E, {"name": "regex", "pattern": "e", "weight": 0.5},
               {"name": "exact", "column": "sentiment", "weight": 2.0}]
    raw = grpo_config(tmp_path, tiny_model_dir, rewards=rewards)
    raw["train"]["max_steps"] = 1
    run_grpo(_load(tmp_path, raw))
    (row,) = _metrics(tmp_path / "run")
    want = row["reward_function"] + 0.5 * row["reward_regex"] + 2.0 * row["reward_exact"]
    assert row["reward"] == pytest.approx(want, rel=1e-5)
    assert row["reward_exact"] == 0  # no random answer is "fresh" or "rotten"


def _stopped_at(when: str):
    """A reward and a step callback that send a SIGTERM at the end of step 2, or in the middle of step 3
    (while its answers are scored: after the base evaluation's 8 answers and two steps of 16)."""
    calls = {"n": 0}

    def reward(prompt: str, answer: str, row: dict) -> float:
        calls["n"] += 1
        if when == "mid_step" and calls["n"] == 8 + 2 * 16 + 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return letter_e(prompt, answer, row)

    def on_step(step: int) -> None:
        if when == "at_boundary" and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    return reward, on_step


def stoppable(prompt: str, answer: str, row: dict) -> float:
    """The reward of the resume test, replaced there by one that stops the run."""
    return letter_e(prompt, answer, row)


@pytest.mark.parametrize("when", ["at_boundary", "mid_step"])
def test_sigterm_then_resume_gives_the_metrics_of_a_run_never_stopped(tmp_path, tiny_model_dir, monkeypatch, when):
    from tunesmith.stopping import Interrupted

    def raw(name: str) -> dict:
        r = grpo_config(tmp_path, tiny_model_dir, name, max_new_tokens=6, num_iterations=2, minibatch_size=8,
                        rewards=[{"name": "function", "function": "test_align_grpo_run:stoppable"}])
        r["train"].update(max_steps=4, save_every=100)
        return r

    run_grpo(_load(tmp_path, raw("straight")))
    reward, on_step = _stopped_at(when)
    monkeypatch.setattr(sys.modules[__name__], "stoppable", reward)
    stopped = _load(tmp_path, raw("stopped"))
    with pytest.raises(Interrupted):
        run_grpo(stopped, on_step=on_step)
    run = Run(tmp_path / "stopped")
    assert run.status() == "interrupted" and run.has_checkpoint()
    assert json.loads((run.checkpoints / "last" / "state.json").read_text())["step"] == 2
    assert [r["step"] for r in _metrics(run.path)] == [1, 2]
    monkeypatch.undo()
    run_grpo(stopped, resume=True)
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "stopped")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in x.keys() - {"seconds"}:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    tuned = [json.loads((tmp_path / name / "metrics.json").read_text())["tuned"] for name in ("straight", "stopped")]
    assert tuned[1]["mean_reward"] == pytest.approx(tuned[0]["mean_reward"]) and \
        tuned[1]["kl"] == pytest.approx(tuned[0]["kl"], rel=1e-4, abs=1e-6)


def test_the_cli_runs_grpo_and_generate_and_eval_says_what_to_do(tmp_path, tiny_model_dir, capsys):
    from tunesmith.cli import main

    raw = grpo_config(tmp_path, tiny_model_dir, instruction="Review: {text}")
    raw["train"]["max_steps"] = 1
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["grpo", str(path)]) == 0, capsys.readouterr().err
    run_dir = tmp_path / "run"
    saved = load_grpo_config(run_dir / "config.yaml")  # the resolved config reads back
    assert saved.grpo.rewards[0].function == LETTER_E["function"]
    capsys.readouterr()
    assert main(["generate", str(run_dir), "the film is", "--max-new-tokens", "4"]) == 0
    err = cli_fails(capsys, ["eval", str(run_dir)], "is a GRPO run (tunesmith grpo)", "tunesmith generate")
    assert len(err.strip().splitlines()) == 1
    cli_fails(capsys, ["score", str(run_dir), "text"], "is a GRPO run, not a classifier or reward model")
    assert main(["data", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path} (tunesmith grpo): prompts from ") and "(grpo.eval_prompts)" in out


def test_config_problems_are_reported_at_once_with_their_paths(tmp_path, tiny_model_dir, capsys):
    raw = grpo_config(tmp_path, tiny_model_dir, samples_per_prompt=1, loss_type="bnpo", rewards=[
        {"name": "function", "function": "no colon"},
        LETTER_E,
        {"name": "regex", "pattern": "("},
        {"name": "json_schema", "schema": {"type": "object", "oneOf": []}},
        {"name": "exact"},
        {"name": "nope"},
        {"weight": 1.0},
    ])
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(raw))
    err = cli_fails(capsys, ["grpo", str(path)], "grpo.samples_per_prompt", "grpo.loss_type",
                    "grpo.rewards.0.function: give it as module:function or path/to/file.py:function",
                    "grpo.rewards.2.pattern: not a regular expression", "grpo.rewards.3.schema: schema.oneOf",
                    "grpo.rewards.4.column: Field required",
                    "grpo.rewards.5.name: unknown reward 'nope'; known: function, exact, regex, json_schema, run",
                    "grpo.rewards.6.name: give the reward")
    assert "Traceback" not in err
    raw = grpo_config(tmp_path, tiny_model_dir, minibatch_size=99, rewards=[
        {"name": "function", "function": "no_such_module:f"},
        {"name": "function", "function": "test_align_grpo_run:no_such_function"},
        {"name": "run", "run": "missing"}])
    raw["train"].pop("max_steps")
    path.write_text(yaml.safe_dump(raw))
    cli_fails(capsys, ["grpo", str(path)], "train.max_steps", "grpo.minibatch_size",
              "grpo.rewards.0.function: no module named 'no_such_module'",
              "grpo.rewards.1.function: test_align_grpo_run has no function 'no_such_function'",
              "grpo.rewards.2.run: ", "no such run directory")
    raw = grpo_config(tmp_path, tiny_model_dir, rewards=[{"name": "exact", "column": "label"}])
    path.write_text(yaml.safe_dump(raw))
    cli_fails(capsys, ["grpo", str(path)], "grpo.rewards.0.column: ", "has no column 'label' (columns: review, "
              "sentiment)")
    assert not (tmp_path / "run").exists()  # nothing written


def test_the_grpo_doc_names_every_option_and_the_run_store_knows_every_alignment_section():
    from tunesmith.align.grpo_rewards import REWARDS
    from tunesmith.align.options import LOADERS, GRPOOptions
    from tunesmith.store.run import ALIGNMENT_SECTIONS

    doc = (Path(__file__).parent.parent / "docs" / "alignment.md").read_text()
    grpo = doc[doc.index("## GRPO"):]
    fields = [*GRPOOptions.model_fields.items(), *(f for cls in REWARDS.values() for f in cls.model_fields.items())]
    assert [name for name, field in fields if f"`{field.alias or name}`" not in grpo] == []
    assert set(ALIGNMENT_SECTIONS) == set(LOADERS)
