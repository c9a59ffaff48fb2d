"""The fast path must not change the maths: packed == unpacked, label-only head == full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import random_examples
from tunesmith.data.format import IGNORE
from tunesmith.objectives.lm_loss import example_losses, loss_sum
from tunesmith.data.batching import collate, plan_batches, plan_rows


def _examples(n=6, seed=0):
    return random_examples(n, seed)


def _reference_loss(model, examples):
    """Each example alone, unpadded, through the model's own forward and logits."""
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor(ex["labels"][1:])
        logits = model(input_ids=ids).logits[0, :-1]
        mask = labels != IGNORE
        total = total + F.cross_entropy(logits[mask], labels[mask], reduction="sum")
        count += int(mask.sum())
    return total, count


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_plan_rows_fits_every_example_once():
    lengths = [5, 9, 3, 7, 2, 8, 4]
    rows = plan_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)


@pytest.mark.parametrize("chunk", [512, 5])
def test_packed_label_only_loss_and_grads_match_unpacked_full_logits(tiny_model_dir, monkeypatch, chunk):
    from transformers import AutoModelForCausalLM

    import tunesmith.objectives.lm_loss

    # 5 tokens a chunk: the labelled positions span several chunks of the output projection.
    monkeypatch.setattr(tunesmith.objectives.lm_loss, "CHUNK", chunk)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    examples = _examples()
    ref_sum, ref_n = _reference_loss(model, examples)
    (ref_sum / ref_n).backward()
    ref_grads = _grads(model)
    model.zero_grad()

    rows = plan_rows([len(e["input_ids"]) for e in examples], 40)
    assert any(len(r) > 1 for r in rows), "the test must pack several examples into a row"
    batch = collate(examples, rows, 40, pad_id=0)
    fast_sum, fast_n = loss_sum(model, batch, direct=True)
    (fast_sum / fast_n).backward()
    assert fast_n == ref_n
    assert (chunk < fast_n) == (chunk == 5)
    torch.testing.assert_close(fast_sum, ref_sum, rtol=1e-5, atol=1e-5)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    model.zero_grad()
    slow_sum, slow_n = loss_sum(model, batch, direct=False)
    torch.testing.assert_close(slow_sum, ref_sum, rtol=1e-5, atol=1e-5)


def test_per_example_loss_sums_to_the_batch_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples = _examples(5, seed=1)
    with torch.no_grad():
        for rows in plan_batches(examples, 80, 40, seed=None):
            batch = collate(examples, rows, 40, pad_id=0)
            index, sums, counts = example_losses(model, batch)
            assert sorted(index.tolist()) == sorted(i for row in rows for i in row)
            total, n = loss_sum(model, batch)
            torch.testing.assert_close(sums.sum(), total, rtol=1e-5, atol=1e-5)
            assert int(counts.sum()) == n
    single = examples[2]
    ref, _ = _reference_loss(model, [single])
    batch = collate(examples, [[0, 1, 2, 3, 4]], 200, pad_id=0)
    with torch.no_grad():
        index, sums, _ = example_losses(model, batch)
    torch.testing.assert_close(sums[index.tolist().index(2)], ref.detach(), rtol=1e-5, atol=1e-5)
