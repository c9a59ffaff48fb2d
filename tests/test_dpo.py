"""DPO: each loss against a slow reference, answer log-probabilities against a plain forward pass
(EOS in, padding out), log 2 at the first step, and a reference that cannot go stale."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import preference_rows, write_config, write_jsonl
from tunesmith.config import load_config
from tunesmith.data.format import IGNORE
from tunesmith.objectives.dpo import pair_logps
from tunesmith.objectives.preference_losses import LOSSES
from tunesmith.session import Session


def _slow_loss(name: str, pc: float, pr: float, rc: float, rr: float, beta: float, eps: float) -> float:
    h = (pc - rc) - (pr - rr)

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x))

    if name == "sigmoid":
        return -log_sigmoid(beta * h)
    if name == "conservative":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if name == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return max(0.0, 1 - beta * h)


@pytest.mark.parametrize("name", list(LOSSES))
def test_each_loss_matches_a_slow_reference(name):
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(4, 16, generator=g, dtype=torch.float64) * 30
    got = LOSSES[name](*logps, beta=0.2, label_smoothing=0.1)
    want = [_slow_loss(name, *logps[:, i].tolist(), 0.2, 0.1) for i in range(16)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_conservative_without_smoothing_is_dpo():
    logps = -torch.rand(4, 8, dtype=torch.float64) * 10
    torch.testing.assert_close(LOSSES["conservative"](*logps, beta=0.5), LOSSES["sigmoid"](*logps, beta=0.5))


def _session(tmp_path, model_dir, method=None, **objective):
    data = {"path": str(write_jsonl(tmp_path / "pairs.jsonl", preference_rows(24))), "max_length": 96,
            "split": {"validation": 0.0, "test": 0.0}}
    path = write_config(tmp_path / "c.yaml", model_dir, data, objective={"name": "dpo", **objective},
                        **({"method": method} if method else {}))
    session = Session(load_config(path))
    session.prepare()
    return session


def _slow_logps(model, item) -> tuple[float, ...]:
    """Each answer alone, through the model's own forward: the sum of its trained tokens' log-probs."""
    out = []
    for answer in (item["chosen"], item["rejected"]):
        ids = torch.tensor([answer["input_ids"]])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        out.append(sum(float(logprobs[t - 1, answer["labels"][t]]) for t in range(1, len(ids[0]))
                       if answer["labels"][t] != IGNORE))
    return tuple(out)


@torch.no_grad()
def test_answer_logps_match_each_answer_alone_eos_in_padding_out(tmp_path, tiny_model_dir, tiny_tokenizer):
    session = _session(tmp_path, tiny_model_dir)
    tokenizer = session.tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the case where peers masked EOS
    items = session.data.encoded["train"]
    model = session.load_model([]).eval()
    batches = session.objective.batches(items)
    rows = [0, 1, 2, 3]  # answers of different lengths: the batch is padded
    batch = batches.tensors(rows)
    assert (batch["seq_ids"] == -1).any()
    got = pair_logps(model, batch)
    for r, i in enumerate(rows):
        trained = [label for label in items[i]["chosen"]["labels"] if label != IGNORE]
        assert trained[-1] == tokenizer.eos_token_id  # EOS is trained
        torch.testing.assert_close(got[r].double(), torch.tensor(_slow_logps(model, items[i]), dtype=torch.float64),
                                   rtol=1e-4, atol=1e-4)
    # Whatever the padding holds, no log-prob is taken there.
    batch["input_ids"][batch["seq_ids"] == -1] = 7
    torch.testing.assert_close(pair_logps(model, batch), got)


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, {"name": "full"}])
def test_first_step_loss_is_log_2_with_the_reference_equal_to_the_policy(tmp_path, tiny_model_dir, method):
    session = _session(tmp_path, tiny_model_dir, method)
    model = session.method.apply(session.load_model([]), session.config.method)
    batches = session.objective.batches(session.data.encoded["train"])
    batch = batches.tensors(batches.epoch(0)[0])
    loss = batches.loss(model, batch)
    assert loss.requires_grad
    assert loss.item() / batches.trained_tokens(batch) == pytest.approx(math.log(2), abs=1e-5)


def test_precomputed_reference_cannot_go_stale(tmp_path, tiny_model_dir):
    """Full fine-tuning: the reference is scored before the first step; a pair first seen after the
    model changed is scored by the base, never by the changed model."""
    session = _session(tmp_path, tiny_model_dir, {"name": "full"})
    items = session.data.encoded["train"]
    train, unseen = items[:16], items[16:]
    objective = session.objective
    objective.prepared.encoded["train"] = train  # the run does not know `unseen` before training
    model = session.method.apply(session.load_model([]), session.config.method)
    with torch.no_grad():
        base = [_slow_logps(model, item) for item in items]
    batches = objective.batches(train)
    batches.loss(model, batches.tensors(batches.epoch(0)[0]))  # the first step: every known pair scored
    assert len(objective.reference.logps) == len(train)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)  # an optimizer step
    view = objective.batches(unseen)
    batch = view.tensors(list(range(len(unseen))))
    policy, reference = view.logps(model, batch)
    want = torch.tensor([base[16 + i] for i in range(len(unseen))], dtype=torch.float32)
    torch.testing.assert_close(reference, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(policy.detach(), want, atol=1e-2)  # the changed model would have been wrong
    # Pairs scored before the change keep their values.
    known = torch.stack([objective.reference.logps[k] for k in list(objective.reference.logps)[:3]])
    assert torch.isfinite(known).all()


def test_the_lora_reference_is_the_base_whatever_the_adapter_learned(tmp_path, tiny_model_dir):
    session = _session(tmp_path, tiny_model_dir, {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0})
    items = session.data.encoded["train"][:4]
    model = session.method.apply(session.load_model([]), session.config.method)
    with torch.no_grad():
        base = torch.tensor([_slow_logps(model, item) for item in items], dtype=torch.float32)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    batches = session.objective.batches(items)
    policy, reference = batches.logps(model, batches.tensors([0, 1, 2, 3]))
    torch.testing.assert_close(reference, base, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(policy.detach(), base, atol=1e-2)


def test_dpo_refuses_prompt_learning_methods(tmp_path, tiny_model_dir, capsys):
    from conftest import cli_fails

    path = write_config(tmp_path / "c.yaml", tiny_model_dir, {"path": "x.jsonl"}, objective={"name": "dpo"},
                        method={"name": "prompt"})
    cli_fails(capsys, ["train", str(path)], "method.name: prompt cannot train objective dpo")
