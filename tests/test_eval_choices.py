"""Scoring label answers with a shared prompt gives the same numbers as one sequence per answer."""

from __future__ import annotations

import torch

from conftest import review_rows
from tunesmith.data.format import Encoder, Schema, to_examples
from tunesmith.eval.metrics import macro_f1
from tunesmith.objectives.base import Layout
from tunesmith.objectives.causal import score_labels


def test_shared_prompt_scores_equal_separate_sequences(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    schema = Schema("classification", {"text": "review", "label": "sentiment"})
    examples = to_examples([{**r, "_line": i} for i, r in enumerate(review_rows(9))], schema,
                           "classify: {text}", "mem")
    encoder = Encoder(tiny_tokenizer, "chat", None, 64)
    # Labels that share their first characters exercise answers that diverge after the prompt.
    labels = ["fresh", "rotten", "fresher"]
    fast, fast_n = score_labels(model, encoder, examples, labels, Layout(256, 64, pad_id=0, seed=0, direct=True))
    slow, slow_n = score_labels(model, encoder, examples, labels, Layout(256, 64, pad_id=0, seed=0, direct=False))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast_n, slow_n)


def test_macro_f1():
    assert macro_f1(["a", "a", "b", "b"], ["a", "a", "b", "b"], ["a", "b"]) == 1.0
    # a: tp 1 fp 0 fn 1 -> 2/3; b: tp 2 fp 1 fn 0 -> 4/5
    assert abs(macro_f1(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"]) - (2 / 3 + 4 / 5) / 2) < 1e-9
