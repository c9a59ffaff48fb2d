"""Prompt-learning methods (prefix, prompt, p-tuning): one example per row, losses equal PEFT's own."""

from __future__ import annotations

import pytest
import torch

from conftest import random_examples
from tunesmith.data.format import IGNORE
from tunesmith.errors import TunesmithError
from tunesmith.methods import REGISTRY
from tunesmith.objectives.lm_loss import example_losses, loss_sum
from tunesmith.data.batching import collate, plan_batches

PROMPT_LEARNING = ["prefix", "prompt", "ptuning"]


def _examples(n=7, seed=0):
    return random_examples(n, seed)


def _tuned(name, model_dir, **options):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return REGISTRY[name].apply(base, REGISTRY[name].options(num_virtual_tokens=4, **options))


def test_one_per_row_batches_hold_every_example_once_within_the_token_budget():
    examples = _examples(20)
    lengths = [len(e["input_ids"]) for e in examples]
    batches = plan_batches(examples, batch_tokens=60, row_len=16, seed=3, one_per_row=True)
    rows = [row for batch in batches for row in batch]
    assert all(len(row) == 1 for row in rows)
    assert sorted(i for (i,) in rows) == list(range(len(examples)))
    assert all(len(batch) * max(min(lengths[i], 16) for (i,) in batch) <= 60 for batch in batches)
    assert any(len(batch) > 1 for batch in batches)
    assert plan_batches(examples, 60, 16, seed=3, one_per_row=True) == batches
    assert sorted(map(str, plan_batches(examples, 60, 16, seed=None, one_per_row=True))) == sorted(map(str, batches))


@pytest.mark.parametrize("name", PROMPT_LEARNING)
def test_forward_loss_on_padded_rows_equals_peft_loss_on_each_example(name, tiny_model_dir):
    model = _tuned(name, tiny_model_dir).eval()
    examples = _examples()
    batches = plan_batches(examples, batch_tokens=60, row_len=40, seed=None, one_per_row=True)
    assert any(len(rows) > 1 for rows in batches), "the test must right-pad some rows"
    sums = torch.zeros(len(examples))
    with torch.no_grad():
        for rows in batches:
            index, s, _ = example_losses(model, collate(examples, rows, 40, pad_id=0), direct=False)
            sums.index_add_(0, index, s)
        for i, ex in enumerate(examples):
            labels = torch.tensor([ex["labels"]])
            out = model(input_ids=torch.tensor([ex["input_ids"]]), labels=labels)
            n = int((labels[:, 1:] != IGNORE).sum())
            torch.testing.assert_close(sums[i], out.loss * n, rtol=1e-5, atol=1e-5, msg=f"example {i}")


@pytest.mark.parametrize("name", PROMPT_LEARNING)
def test_packed_rows_are_refused(name, tiny_model_dir):
    model = _tuned(name, tiny_model_dir)
    examples = _examples()
    batch = collate(examples, [[0, 1, 2]], 64, pad_id=0)
    with pytest.raises(ValueError, match="one example per row"):
        loss_sum(model, batch, direct=False)


def test_prompt_tuning_starts_from_the_init_text(tiny_model_dir, tiny_tokenizer):
    model = _tuned("prompt", tiny_model_dir, prompt_init_text="classify sentiment")
    ids = tiny_tokenizer("classify sentiment")["input_ids"]
    expected = model.get_input_embeddings().weight[(ids * 4)[:4]]
    torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight, expected)


@pytest.mark.parametrize("name", PROMPT_LEARNING)
def test_prompt_learning_on_a_model_without_attention_is_a_clear_error(name):
    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1))
    with pytest.raises(TunesmithError, match=rf"{name} needs a decoder with attention layers; model type 'mamba'"):
        REGISTRY[name].apply(mamba, REGISTRY[name].options())
