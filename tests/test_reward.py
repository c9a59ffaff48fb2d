"""Reward model: the Bradley-Terry loss against a slow reference, the score read at each text's last
real token (never at padding, with pad equal to EOS), and encoders as well as decoders."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.model import load_model
from tunesmith.objectives.reward import bradley_terry_loss, reward_text, rewards, score_texts

TEXTS = ["a great film", "honestly the movie is dull and the plot is weak", "fun", "the cast is superb"]


def test_bradley_terry_loss_matches_a_slow_reference():
    g = torch.Generator().manual_seed(0)
    chosen, rejected, margin = torch.randn(3, 10, generator=g, dtype=torch.float64)
    got = bradley_terry_loss(chosen, rejected, margin, center=0.01)
    want = [math.log1p(math.exp(-(c - r - m))) + 0.01 * (c + r) ** 2
            for c, r, m in zip(chosen.tolist(), rejected.tolist(), margin.tolist())]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), -torch.nn.functional.logsigmoid(chosen - rejected))


@pytest.fixture(params=["tiny_model_dir", "tiny_bert_dir"])
def reward_model(request):
    path = request.getfixturevalue(request.param)
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = load_model(str(path), "AutoModelForSequenceClassification", num_labels=1).eval()
    return model, AutoTokenizer.from_pretrained(path)


def test_scores_do_not_depend_on_padding_or_batch(reward_model):
    model, tokenizer = reward_model
    texts = TEXTS + [reward_text(tokenizer, [{"role": "user", "content": "review"}], "great")]
    alone = [score_texts(model, tokenizer, [t])[0] for t in texts]
    together = score_texts(model, tokenizer, texts, batch_size=8)
    assert together == pytest.approx(alone, abs=1e-5)
    assert len(set(round(s, 5) for s in alone)) == len(alone)  # the texts score differently


@torch.no_grad()
def test_a_decoders_score_is_read_at_the_last_real_token_even_when_pad_is_eos(tiny_model_dir, tiny_tokenizer):
    tokenizer = tiny_tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), "AutoModelForSequenceClassification", num_labels=1).eval()
    # An answer that ends with EOS (= pad), padded with more of it.
    ids = tokenizer("a great film", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    padded = torch.tensor([ids + [tokenizer.pad_token_id] * 3])
    mask = torch.tensor([[1] * len(ids) + [0] * 3])
    hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state
    at_eos = model.score(hidden[0, -1]).item()
    before_eos = model.score(hidden[0, -2]).item()
    assert rewards(model, padded, mask).item() == pytest.approx(at_eos, abs=1e-5)
    assert at_eos != pytest.approx(before_eos, abs=1e-4)
