"""Metrics on held-out data, computed the same way for the base and the tuned model."""

from __future__ import annotations

import math

import torch

from tunesmith.data.format import IGNORE, Encoder
from tunesmith.eval.choices import score_choices
from tunesmith.train.loop import evaluate_loss
from tunesmith.train.loss import per_example_loss
from tunesmith.train.packing import collate, plan_batches


def macro_f1(gold: list[str], pred: list[str], labels: list[str]) -> float:
    scores = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def with_answer(example: dict, answer: str) -> dict:
    messages = [*example["messages"][:-1], {"role": "assistant", "content": answer}]
    return {**example, "messages": messages}


@torch.no_grad()
def score_labels(model, encoder: Encoder, examples: list[dict], labels: list[str], batch_tokens: int,
                 row_len: int, pad_id: int, direct: bool = True,
                 one_per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and trained-token count of every (example, label) answer, each [examples, labels]."""
    choices = [[encoder.encode(with_answer(ex, label)) for label in labels] for ex in examples]
    counts = torch.tensor([[sum(t != IGNORE for t in c["labels"][1:]) for c in group] for group in choices])
    was_training = model.training
    model.eval()
    if direct:
        totals = score_choices(model, choices, batch_tokens, row_len)
    else:
        candidates = [c for group in choices for c in group]
        totals = torch.zeros(len(candidates))
        for rows in plan_batches(candidates, batch_tokens, row_len, seed=None, one_per_row=one_per_row):
            batch = collate(candidates, rows, row_len, pad_id)
            sums, _ = per_example_loss(model, batch, len(candidates), direct)
            totals += sums
        totals = totals.view(len(examples), len(labels))
    model.train(was_training)
    return totals, counts


def evaluate(model, encoder: Encoder, examples: list[dict], encoded: list[dict], labels: list[str],
             batch_tokens: int, row_len: int, pad_id: int, direct: bool = True, one_per_row: bool = False) -> dict:
    """``loss`` and ``perplexity`` always; ``accuracy`` and ``macro_f1`` when there are labels.

    With labels, the model's choice is the label string with the highest log-likelihood, and the
    loss comes from the same forward passes (the gold label's answer), not from a second pass.
    """
    if not labels:
        loss = evaluate_loss(model, encoded, batch_tokens, row_len, pad_id, direct, one_per_row)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    sums, counts = score_labels(model, encoder, examples, labels, batch_tokens, row_len, pad_id, direct,
                                one_per_row)
    gold_index = torch.tensor([labels.index(e["label"]) for e in examples]).unsqueeze(1)
    loss = float(sums.gather(1, gold_index).sum() / counts.gather(1, gold_index).sum())
    gold = [e["label"] for e in examples]
    pred = [labels[i] for i in sums.argmin(dim=1).tolist()]
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        "accuracy": sum(g == p for g, p in zip(gold, pred)) / len(gold),
        "macro_f1": macro_f1(gold, pred, labels),
    }


@torch.no_grad()
def generate_samples(model, tokenizer, encoder: Encoder, examples: list[dict], max_new_tokens: int) -> list[dict]:
    """Greedy completions for a few held-out prompts."""
    samples = []
    was_training = model.training
    model.eval()
    for ex in examples:
        if "messages" in ex:
            prompt = encoder.prompt_text(ex)
            shown = next(m["content"] for m in reversed(ex["messages"]) if m["role"] != "assistant")
            expected = ex["messages"][-1]["content"] if ex["messages"][-1]["role"] == "assistant" else ""
        else:
            words = ex["text"].split()
            prompt, expected = " ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2 :])
            shown = prompt
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        samples.append({"prompt": shown, "expected": expected, "output": text.strip()})
    model.train(was_training)
    return samples
