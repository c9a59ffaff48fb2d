"""PPO end to end on tiny models: a toy reward rises, the adapter trains, resume continues the same
steps, rewards come from tunesmith runs, and bad reward runs fail with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import cli_fails, review_rows, write_config, write_jsonl

from tunesmith.align.options import load_ppo_config
from tunesmith.align.recipe import run_ppo
from tunesmith.store import Run


def _prompts(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [{"text": r["review"]} for r in review_rows(40)])


def ppo_config(tmp_path: Path, model_dir: Path, name: str = "run", **ppo) -> dict:
    return {
        "model": {"name": str(model_dir)},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 8, "lr": 0.03, "warmup_ratio": 0.0, "scheduler": "constant", "save_every": 2},
        "output": {"dir": str(tmp_path / name)},
        "ppo": {"prompts": str(_prompts(tmp_path)), "eval_prompts": 8, "prompts_per_step": 4,
                "samples_per_prompt": 4, "max_new_tokens": 8, "minibatch_size": 8, "kl_coef": 0.01, **ppo},
    }


def letter_e(prompts: list[str], answers: list[str]) -> list[float]:
    """A toy reward that a tiny random model can learn within a few steps: how often 'e' appears."""
    return [float(a.count("e")) for a in answers]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ppo_raises_a_toy_reward_and_trains_the_adapter_and_value_head(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    config = load_ppo_config(tmp_path / "ppo.yaml", raw=ppo_config(tmp_path, tiny_model_dir))
    report = run_ppo(config, reward=letter_e)
    run_dir = tmp_path / "run"
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout's policy is the reference
    first, last = sum(r["reward"] for r in rows[:2]) / 2, sum(r["reward"] for r in rows[-2:]) / 2
    assert last > first + 1.0, (first, last)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["tuned"]["mean_reward"] > summary["base"]["mean_reward"]
    assert summary["tuned"]["kl"] > 0
    # LoRA's B matrices start at zero, as does the value head: all must have moved.
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    assert all(v.abs().sum() > 0 for v in load_file(run_dir / "value_head.safetensors").values())
    assert Run(run_dir).status() == "complete"
    text = report.read_text()
    assert "mean reward" in text and "Win-rate" in text and (run_dir / "curves.png").is_file()


def test_resume_continues_the_same_steps_as_a_run_never_stopped(tmp_path, tiny_model_dir):
    straight = load_ppo_config(tmp_path / "a.yaml", raw=ppo_config(tmp_path, tiny_model_dir, "a", max_new_tokens=6)
                               | {"train": {"max_steps": 4, "lr": 0.03, "warmup_ratio": 0.0, "save_every": 2}})
    run_ppo(straight, reward=letter_e)
    stopped = straight.model_copy(update={"output": straight.output.model_copy(update={"dir": str(tmp_path / "b")})})

    def interrupt(step: int) -> None:
        if step == 3:  # the checkpoint is step 2's (save_every 2): step 3 is taken again
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_ppo(stopped, reward=letter_e, on_step=interrupt)
    assert Run(tmp_path / "b").status() == "interrupted"
    run_ppo(stopped, resume=True, reward=letter_e)
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("reward", "kl", "policy_loss", "value_loss", "kl_coef", "lr"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (x["step"], key)


def test_adaptive_kl_coefficient_is_logged_and_moves(tmp_path, tiny_model_dir):
    raw = ppo_config(tmp_path, tiny_model_dir, kl_target=0.5, kl_horizon=100)
    raw["train"]["max_steps"] = 3
    run_ppo(load_ppo_config(tmp_path / "ppo.yaml", raw=raw), reward=letter_e)
    coefs = [r["kl_coef"] for r in _metrics(tmp_path / "run")]
    assert coefs[0] == 0.01 and coefs[1] < coefs[0]  # step 1 has KL 0 < target: the coefficient falls


def test_generate_answers_with_a_ppo_runs_policy_and_eval_says_what_to_do(tmp_path, tiny_model_dir, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.cli import main

    raw = ppo_config(tmp_path, tiny_model_dir, instruction="Review: {text}")
    raw["train"]["max_steps"] = 2
    run_ppo(load_ppo_config(tmp_path / "ppo.yaml", raw=raw), reward=letter_e)
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert main(["generate", str(run_dir), "the film is", "--max-new-tokens", "8"]) == 0
    # The slow way: PEFT's adapter on the base, the instruction in the chat template, greedy.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "adapter").eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Review: the film is"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        with model.disable_adapter():
            base = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert not torch.equal(out, base)  # so the answer below shows the policy's adapter was loaded
    assert capsys.readouterr().out.strip() == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    err = cli_fails(capsys, ["eval", str(run_dir)], "is a PPO run (tunesmith ppo)", "tunesmith generate")
    assert len(err.strip().splitlines()) == 1


def _train(tmp_path: Path, model_dir: Path, data: dict, name: str, **sections) -> Path:
    from tunesmith.config import load_config
    from tunesmith.recipe import run_training

    config = write_config(tmp_path / f"{name}.yaml", model_dir, data, train={"max_steps": 2, "eval_every": 2},
                          output={"dir": str(tmp_path / name)}, **sections)
    run_training(load_config(config))
    return tmp_path / name


def test_a_classification_run_is_a_reward_through_the_cli(tmp_path, tiny_model_dir, review_data, capsys):
    from tunesmith.cli import main

    classifier = _train(tmp_path, tiny_model_dir, review_data, "classifier", objective={"name": "classification"})
    raw = ppo_config(tmp_path, tiny_model_dir, reward=str(classifier), reward_label="positive")
    raw["train"]["max_steps"] = 1
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["ppo", str(path)]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["steps"] == 1 and summary["reward_run"] == str(classifier)


def test_a_causal_run_on_label_data_scores_answers_by_label_log_odds(tmp_path, tiny_model_dir, review_data):
    import torch

    from tunesmith.align.rewards import load_reward
    from tunesmith.objectives.causal import score_labels
    from tunesmith.session import load_run

    run_dir = _train(tmp_path, tiny_model_dir, review_data, "labeller")
    answers = ["the film is great", "the plot is dull and boring"]
    scores = load_reward(run_dir, "positive")(["p", "p"], answers)
    # The slow way: the label strings' summed losses after the run's instruction, one example at a time.
    _, session, model = load_run(run_dir)
    labels = Run(run_dir).labels()
    for answer, score in zip(answers, scores):
        example = {"messages": [{"role": "user", "content": f"classify sentiment: {answer}"},
                                {"role": "assistant", "content": ""}]}
        sums, _ = score_labels(model, session.objective.encoder, [example], labels, session.layout)
        logp = -sums[0]
        pos = labels.index("positive")
        want = logp[pos] - torch.logsumexp(torch.cat([logp[:pos], logp[pos + 1:]]), 0)
        assert score == pytest.approx(float(want), abs=1e-4)


def _fake_run(path: Path, model_dir: Path, data: dict, labels: list[str], **sections) -> Path:
    from tunesmith.config import load_config, save_config

    path.mkdir()
    config = load_config(write_config(path.parent / f"{path.name}.yaml", model_dir, data, **sections))
    save_config(config, path / "config.yaml")
    (path / "labels.json").write_text(json.dumps(labels))
    return path


@pytest.mark.parametrize("case", ["missing", "not_a_run", "seq2seq", "causal_no_labels", "unknown_label", "ppo_run"])
def test_a_bad_reward_run_fails_with_one_line(tmp_path, tiny_model_dir, review_data, capsys, case):
    reward = tmp_path / "reward"
    if case == "not_a_run":
        reward.mkdir()
    elif case == "seq2seq":
        _fake_run(reward, tiny_model_dir, review_data, [], objective={"name": "seq2seq"})
    elif case == "causal_no_labels":
        _fake_run(reward, tiny_model_dir, {"path": review_data["path"], "format": "text"}, [])
    elif case == "unknown_label":
        _fake_run(reward, tiny_model_dir, review_data, ["negative", "positive"], objective={"name": "classification"})
    elif case == "ppo_run":
        reward.mkdir()
        (reward / "config.yaml").write_text(yaml.safe_dump(ppo_config(tmp_path, tiny_model_dir)))
    raw = ppo_config(tmp_path, tiny_model_dir, reward=str(reward), reward_label="glowing")
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(raw))
    expected = {"missing": "no such run directory", "not_a_run": "not a tunesmith run directory",
                "seq2seq": "is a seq2seq run, not a classifier or reward model",
                "causal_no_labels": "is a causal run without labels", "unknown_label": "'glowing' is not a label",
                "ppo_run": "is a PPO run"}[case]
    err = cli_fails(capsys, ["ppo", str(path)], "ppo.reward", expected)
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing written


def test_config_problems_are_reported_at_once(tmp_path, tiny_model_dir, capsys):
    raw = ppo_config(tmp_path, tiny_model_dir, clip=-1, instruction="no placeholder")
    raw["train"].pop("max_steps")
    raw["ppo"]["minibatch_size"] = 99
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(raw))
    cli_fails(capsys, ["ppo", str(path)], "ppo.clip", "ppo.instruction")
    raw = ppo_config(tmp_path, tiny_model_dir, minibatch_size=99)
    raw["train"].pop("max_steps")
    path.write_text(yaml.safe_dump(raw))
    cli_fails(capsys, ["ppo", str(path)], "train.max_steps", "ppo.minibatch_size")


ALL_EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
PPO_EXAMPLES = [p for p in ALL_EXAMPLES if p.read_text().startswith("# tunesmith ppo ")]


@pytest.mark.parametrize("example", PPO_EXAMPLES, ids=[e.name for e in PPO_EXAMPLES])
def test_shipped_ppo_examples_load(example):
    config = load_ppo_config(example)
    assert config.ppo.reward and config.train.max_steps


@pytest.mark.slow
@pytest.mark.parametrize("example", PPO_EXAMPLES, ids=[e.name for e in PPO_EXAMPLES])
def test_shipped_ppo_examples_read_their_prompts(example):
    from tunesmith.align.prompts import load_prompts

    config = load_ppo_config(example)
    train, held_out = load_prompts(config.ppo, config.train.seed)
    assert len(held_out) == config.ppo.eval_prompts and len(train) > 100


def test_answers_that_share_their_prompt_cache_are_the_answers_without_it(tiny_model_dir, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.align.rollout import shared_prompt_cache

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = [tiny_tokenizer("a great film with many parts").input_ids, tiny_tokenizer("the plot").input_ids]
    width, pad = max(map(len, prompts)), tiny_tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    greedy = {"do_sample": False, "max_new_tokens": 6, "pad_token_id": pad}
    repeated = {"input_ids": ids.repeat_interleave(3, 0), "attention_mask": attention.repeat_interleave(3, 0)}
    alone = model.generate(**repeated, **greedy)
    shared = model.generate(**repeated, past_key_values=shared_prompt_cache(model, ids, attention, 3), **greedy)
    assert torch.equal(alone, shared)
    assert shared_prompt_cache(model, ids, attention, 1) is None


def test_the_ppo_doc_names_every_option():
    from tunesmith.align.options import PPOOptions

    doc = (Path(__file__).parent.parent / "docs" / "alignment.md").read_text()
    assert [f for f in PPOOptions.model_fields if f"`{f}`" not in doc] == []


def test_answer_mask_keeps_the_first_end_token_when_pad_is_the_end_token():
    import torch

    from tunesmith.align.rollout import answer_mask

    end = 2  # generate pads finished answers with the pad id, here the end-of-turn id too
    answers = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 2], [5, 6, 7, 8, 9]])
    mask, ended = answer_mask(answers, {end})
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]


def test_answer_logprobs_match_each_answer_run_alone_and_the_reference_is_the_base(tiny_model_dir, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.align.rollout import (
        PolicyWithValue,
        answer_logprobs,
        model_logprobs,
        reference_logprobs,
        sample,
    )
    from tunesmith.methods import get_method

    lora = get_method("lora")
    model = lora.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora.options(r=4, alpha=8, dropout=0.0))
    policy = PolicyWithValue(model).eval()
    with torch.no_grad():  # an adapter that has trained: the policy is no longer the base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    prompts = [tiny_tokenizer("a great film with many parts").input_ids, tiny_tokenizer("the plot").input_ids]
    torch.manual_seed(0)
    rollout = sample(model, tiny_tokenizer, prompts, 2, 6, temperature=0.7, top_k=0, device="cpu")
    with torch.no_grad():
        logp, _ = answer_logprobs(policy, rollout, 0.7)
    ref = reference_logprobs(policy, rollout, 0.7)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    def alone(m, i: int) -> torch.Tensor:
        # The slow way: the unpadded prompt and answer, one row, log-softmax at every answer token.
        prompt = prompts[i // 2]
        answer = rollout.answers[i][rollout.mask[i].bool()]
        ids = torch.cat([torch.tensor(prompt), answer]).unsqueeze(0)
        with torch.no_grad():
            logits = m(input_ids=ids).logits[0, len(prompt) - 1:-1] / 0.7
        return torch.log_softmax(logits, -1).gather(-1, answer.unsqueeze(-1)).squeeze(-1)

    for i in range(4):
        n = int(rollout.mask[i].sum())
        assert torch.allclose(logp[i, :n], alone(model, i), atol=1e-4)
        assert torch.allclose(ref[i, :n], alone(base, i), atol=1e-4)
    assert not torch.allclose(logp * rollout.mask, ref * rollout.mask, atol=1e-3)
    # The same log-probabilities from the model alone, without the value head (judged evaluation's).
    torch.testing.assert_close(model_logprobs(model, rollout, 0.7), logp)


def test_what_the_sampler_records_is_what_a_fresh_forward_pass_computes(tiny_model_dir, tiny_tokenizer):
    """PPO's old log-probs and values come from the sampling pass itself (sample(record=True))."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.align.rollout import PolicyWithValue, answer_logprobs, sample
    from tunesmith.methods import get_method

    lora = get_method("lora")
    model = lora.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora.options(r=4, alpha=8, dropout=0.0))
    policy = PolicyWithValue(model).eval()
    with torch.no_grad():  # a trained adapter and value head
        for name, p in policy.named_parameters():
            if "lora_B" in name or "value_head" in name:
                p.normal_(0, 0.5)
    prompts = [tiny_tokenizer("a great film with many parts").input_ids, tiny_tokenizer("the plot").input_ids]
    for samples in (2, 1):  # with the shared prompt cache, and without (the first step reads the whole prompt)
        torch.manual_seed(0)
        rollout = sample(model, tiny_tokenizer, prompts, samples, 6, temperature=0.7, top_k=0, device="cpu",
                         record=True)
        with torch.no_grad():
            logp, values = answer_logprobs(policy, rollout, 0.7)
            recorded_values = policy.value_head(rollout.states).squeeze(-1)
        m = rollout.mask.bool()
        assert m.sum() > 4
        torch.testing.assert_close(rollout.logprobs[m], logp[m], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(recorded_values[m], values[m], atol=1e-4, rtol=1e-4)


def test_sigterm_stops_at_the_next_step_boundary_with_a_checkpoint(tmp_path, tiny_model_dir):
    import os
    import signal

    from tunesmith.train.loop import Interrupted

    raw = ppo_config(tmp_path, tiny_model_dir, max_new_tokens=4)
    raw["train"].update(max_steps=3, save_every=100)

    def terminate(step: int) -> None:
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        run_ppo(load_ppo_config(tmp_path / "ppo.yaml", raw=raw), reward=letter_e, on_step=terminate)
    run = Run(tmp_path / "run")
    assert run.status() == "interrupted" and run.has_checkpoint()
    assert json.loads((run.checkpoints / "last" / "state.json").read_text())["step"] == 1
    assert [r["step"] for r in _metrics(run.path)] == [1]
