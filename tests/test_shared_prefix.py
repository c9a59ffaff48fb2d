"""Shared-prefix packing: rows that hold the examples' common first tokens once give the same loss
and gradients as every example run alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import random_examples
from tunesmith.data.batching import collate, collate_shared, plan_batches, shared_prefix
from tunesmith.data.format import IGNORE
from tunesmith.objectives.base import Layout
from tunesmith.objectives.causal import PackedBatches
from tunesmith.objectives.lm_loss import example_losses, loss_sum

PREFIX = [7, 11, 13, 17, 19, 23]


def _examples(n=9, seed=0):
    """A common prefix, then each example's own tokens; trained tokens start after two of its own."""
    out = []
    for ex in random_examples(n, seed):
        own = ex["input_ids"]
        ids = PREFIX + own
        first = len(PREFIX) + 2 + len(own) // 3
        out.append({"input_ids": ids, "labels": [IGNORE] * first + ids[first:]})
    return out


def _reference(model, examples):
    """Summed loss and count, each example alone through the model's own forward and logits."""
    total, count = 0.0, 0
    for ex in examples:
        logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(ex["labels"][1:])
        mask = labels != IGNORE
        total = total + F.cross_entropy(logits[mask], labels[mask], reduction="sum")
        count += int(mask.sum())
    return total, count


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def test_the_prefix_is_found_from_the_tokens_and_stops_before_the_first_trained_token():
    examples = _examples()
    assert shared_prefix(examples) == len(PREFIX)
    # An example trained from its third token leaves one token to share: the second one predicts it.
    early = {"input_ids": PREFIX + [5, 6], "labels": [IGNORE, IGNORE, *PREFIX[2:], 5, 6]}
    assert shared_prefix([*examples, early]) == 1
    assert shared_prefix(examples[:1]) == 0
    assert shared_prefix(random_examples(6)) == 0


def test_shared_prefix_rows_give_the_loss_and_gradients_of_examples_alone(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    examples = _examples()
    prefix = shared_prefix(examples)
    plan = plan_batches(examples, batch_tokens=90, row_len=30, seed=None, prefix=prefix)
    assert any(len(row) > 2 for rows in plan for row in rows), "rows must hold several remainders"
    assert sorted(i for rows in plan for row in rows for i in row) == list(range(len(examples)))

    total, count = 0.0, 0
    for rows in plan:
        batch = collate_shared(examples, rows, 30, pad_id=0, prefix=prefix)
        assert int(batch["input_ids"].ne(0).sum()) < sum(len(examples[i]["input_ids"]) for r in rows for i in r)
        s, n = loss_sum(model, batch)
        total, count = total + s, count + n
    total.backward()
    shared_grads = _grads(model)

    ref_total, ref_count = _reference(model, examples)
    ref_total.backward()
    ref_grads = _grads(model)

    assert count == ref_count
    torch.testing.assert_close(total.detach(), ref_total.detach(), rtol=1e-5, atol=1e-5)
    assert shared_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        # Sums over many positions in another order: float32 noise relative to the tensor's scale.
        scale = float(grad.abs().max())
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=2e-6 * scale, msg=name)


def test_per_example_losses_with_a_shared_prefix(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    examples = _examples(6, seed=2)
    prefix = shared_prefix(examples)
    with torch.no_grad():
        batch = collate_shared(examples, [[0, 1, 2], [3, 4, 5]], 60, pad_id=0, prefix=prefix)
        index, sums, _ = example_losses(model, batch)
        for i, s in zip(index.tolist(), sums):
            alone, _ = _reference(model, [examples[i]])
            torch.testing.assert_close(s, alone, rtol=1e-5, atol=1e-5)


def test_packed_batches_share_the_prefix_and_count_every_example_token():
    examples = _examples(12, seed=1)
    layout = Layout(batch_tokens=60, row_len=30, pad_id=0, seed=0, shared_prefix=True)
    shared, plain = PackedBatches(examples, layout), PackedBatches(examples, Layout(60, 30, 0, 0))
    assert shared.prefix == len(PREFIX) and plain.prefix == 0
    assert len(shared.epoch(0)) < len(plain.epoch(0))  # more examples a batch: fewer batches
    # tokens/s stands for the examples' tokens, as if each had its prefix.
    counted = sum(shared.input_tokens(shared.tensors(b)) for b in shared.epoch(0))
    assert counted == sum(len(e["input_ids"]) for e in examples)
    plain_batch = collate(examples, plain.epoch(0)[0], 30, 0)
    assert plain.input_tokens(plain_batch) == int((plain_batch["seq_ids"] >= 0).sum())
