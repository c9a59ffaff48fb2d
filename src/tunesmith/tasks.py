"""Task types beyond the causal LM: sequence classification (a head on an encoder or decoder) and
sequence-to-sequence (T5-style).

Each task turns canonical examples into items, plans length-grouped padded batches (encoders attend
both ways, so packing would need per-example masks; grouping by length keeps padding small), and
computes the summed loss of a batch. The training loop only sees ``TaskBatches``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunesmith.data.format import IGNORE
from tunesmith.errors import TunesmithError


def length_grouped(lengths: list[int], batch_tokens: int, seed: int | None) -> list[list[int]]:
    """Batches of similar-length examples whose padded size stays within ``batch_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for i in order:
        # Ascending order: the newest example is the longest, so it sets the padded width.
        if current and lengths[i] * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    if seed is not None:
        random.Random(seed).shuffle(batches)
    return batches


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out


def user_input(example: dict) -> str:
    """The input side of a canonical example: its text, or its non-assistant messages."""
    if "text" in example:
        return example["text"]
    return "\n".join(m["content"] for m in example["messages"] if m["role"] != "assistant")


@dataclass
class TaskBatches:
    """Length-grouped padded batches for classification and seq2seq; same interface as causal ``Batches``."""

    items: list[dict]
    batch_tokens: int
    seed: int
    pad_id: int
    kind: str  # "classification" or "seq2seq"

    def epoch(self, epoch: int) -> list[list[int]]:
        return length_grouped([_length(x) for x in self.items], self.batch_tokens,
                              None if epoch < 0 else self.seed + epoch)

    def tensors(self, rows: list[int]) -> dict[str, torch.Tensor]:
        chosen = [self.items[i] for i in rows]
        ids = _pad([x["input_ids"] for x in chosen], self.pad_id)
        batch = {"input_ids": ids, "attention_mask": _pad([[1] * len(x["input_ids"]) for x in chosen], 0)}
        if self.kind == "classification":
            batch["labels"] = torch.tensor([x["label"] for x in chosen])
        else:
            batch["labels"] = _pad([x["labels"] for x in chosen], IGNORE)
        return batch

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        return task_loss(model, batch, self.kind)

    def trained_tokens(self, batch) -> int:
        """What the loss is averaged over: examples (classification) or target tokens (seq2seq)."""
        if self.kind == "classification":
            return len(batch["labels"])
        return int((batch["labels"] != IGNORE).sum())

    @staticmethod
    def input_tokens(batch) -> int:
        return int(batch["attention_mask"].sum())

    @torch.no_grad()
    def mean_loss(self, model, items: list[dict]) -> float:
        view = TaskBatches(items, self.batch_tokens, self.seed, self.pad_id, self.kind)
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for rows in view.epoch(-1):
            s, n = view.loss(model, _to(view.tensors(rows), model))
            total, count = total + s.item(), count + n
        model.train(was_training)
        return total / max(count, 1)


def _length(item: dict) -> int:
    return len(item["input_ids"]) + len(item.get("labels") or [])


def task_loss(model, batch: dict, kind: str) -> tuple[torch.Tensor, int]:
    """Summed loss and its count: examples for classification, target tokens for seq2seq."""
    if kind == "classification":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), len(batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   labels=batch["labels"]).logits
    mask = batch["labels"] != IGNORE
    return F.cross_entropy(logits[mask].float(), batch["labels"][mask], reduction="sum"), int(mask.sum())


def encode_classification(examples: list[dict], tokenizer, labels: list[str], max_length: int) -> list[dict]:
    index = {label: i for i, label in enumerate(labels)}
    # The raw text, not the instruction prompt: a classification head needs no instructions.
    return [{"input_ids": tokenizer(e["_input"], truncation=True, max_length=max_length)["input_ids"],
             "label": index[e["label"]]} for e in examples]


def encode_seq2seq(examples: list[dict], tokenizer, max_length: int, answer: str | None = None) -> list[dict]:
    """Source = the input side, target = the answer (or ``answer`` for label scoring)."""
    items = []
    for e in examples:
        target = answer if answer is not None else e["messages"][-1]["content"]
        labels = tokenizer(text_target=target, truncation=True, max_length=max_length)["input_ids"]
        if not labels or labels[-1] != tokenizer.eos_token_id:
            labels = [*labels[: max_length - 1], tokenizer.eos_token_id]  # the model must learn to stop
        items.append({"input_ids": tokenizer(user_input(e), truncation=True, max_length=max_length)["input_ids"],
                      "labels": labels})
    return items


def check_task_data(task: str, kind: str) -> None:
    if task == "classification" and kind != "classification":
        raise TunesmithError(
            f"model.task classification needs text/label data, but the data is {kind}: "
            "name the label column under data.columns.label"
        )
    if task == "seq2seq" and kind == "text":
        raise TunesmithError("model.task seq2seq needs inputs and targets (prompt/completion, chat or label data)")


@torch.no_grad()
def evaluate_task(model, batches: TaskBatches, labels: list[str], examples: list[dict], tokenizer,
                  max_length: int) -> dict:
    """loss and perplexity always; accuracy and macro-F1 when the data has labels."""
    from tunesmith.eval.metrics import macro_f1

    was_training = model.training
    model.eval()
    loss = batches.mean_loss(model, batches.items)
    predictions = {}
    if batches.kind == "classification":
        for rows in batches.epoch(-1):
            batch = _to(batches.tensors(rows), model)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            predictions.update(zip(rows, logits.argmax(-1).tolist()))
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    if labels:
        gold = [e["label"] for e in examples]
        if batches.kind == "classification":
            pred = [labels[predictions[i]] for i in range(len(examples))]
        else:
            pred = _seq2seq_choices(model, batches, labels, examples, tokenizer, max_length)
        metrics["accuracy"] = sum(g == p for g, p in zip(gold, pred)) / len(gold)
        metrics["macro_f1"] = macro_f1(gold, pred, labels)
    model.train(was_training)
    return metrics


def _seq2seq_choices(model, batches, labels, examples, tokenizer, max_length) -> list[str]:
    scores = torch.zeros(len(examples), len(labels))
    for k, label in enumerate(labels):
        items = encode_seq2seq(examples, tokenizer, max_length, answer=label)
        scoring = TaskBatches(items, batches.batch_tokens, 0, batches.pad_id, "seq2seq")
        for rows in scoring.epoch(-1):
            batch = _to(scoring.tensors(rows), model)
            logits = model(**batch).logits
            losses = F.cross_entropy(logits.transpose(1, 2).float(), batch["labels"], reduction="none")
            scores[rows, k] = losses.sum(dim=1).cpu()
    return [labels[i] for i in scores.argmin(dim=1).tolist()]


def _to(batch: dict, model) -> dict:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def task_samples(model, kind: str, examples: list[dict], tokenizer, labels: list[str], max_length: int,
                 max_new_tokens: int) -> list[dict]:
    """Predicted label (classification) or greedy output (seq2seq) for a few held-out examples."""
    samples = []
    model.eval()
    for e in examples:
        text = e["_input"] if kind == "classification" and "_input" in e else user_input(e)
        enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        enc = _to(dict(enc), model)
        if kind == "classification":
            output = labels[int(model(**enc).logits.argmax(-1))]
            expected = e["label"]
        else:
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            output = tokenizer.decode(out[0], skip_special_tokens=True).strip()
            expected = e["messages"][-1]["content"]
        samples.append({"prompt": user_input(e), "expected": expected, "output": output})
    return samples
