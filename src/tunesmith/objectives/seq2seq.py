"""Sequence to sequence (T5-style): the encoder reads the input side, the decoder writes the answer.

Label data is scored like the causal objective: the label string with the lowest loss is the
model's choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from tunesmith.data.format import IGNORE
from tunesmith.data.options import DataConfig
from tunesmith.data.pipeline import SPLITS, PreparedData, label_order, load_splits
from tunesmith.errors import TunesmithError
from tunesmith.eval.metrics import label_metrics, loss_metrics
from tunesmith.model import load_model
from tunesmith.objectives.base import SEQ2SEQ, Abilities, Layout, to_device
from tunesmith.objectives.padded import (
    PaddedBatches,
    prompt_learning_is_causal_only,
    refuse_canaries,
    user_input,
)
from tunesmith.options import Section


class Options(Section):
    name: Literal["seq2seq"] = "seq2seq"


def example_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
    losses = F.cross_entropy(logits.transpose(1, 2).float(), labels, reduction="none")  # 0 where IGNORE
    return losses.sum(dim=1), (labels != IGNORE).sum(dim=1)


@dataclass
class Seq2Seq:
    name: ClassVar[str] = "seq2seq"
    Options: ClassVar[type[Section]] = Options
    abilities: ClassVar[Abilities] = Abilities(
        head=SEQ2SEQ, data=("prompt_completion", "chat", "classification"),
        metrics=("loss", "perplexity", "accuracy", "macro_f1"), writes_answers=True, loss_scored=True)
    options: Options
    data: DataConfig
    tokenizer: Any
    layout: Layout

    @classmethod
    def check_method(cls, method) -> list[str]:
        return prompt_learning_is_causal_only(cls.name, method)

    def prepare(self, labels: list[str] | None = None) -> PreparedData:
        refuse_canaries(self.name, self.data)
        splits, schema, stats = load_splits(self.data)
        if schema.kind in ("text", "preference", "unpaired_preference"):
            raise TunesmithError("objective seq2seq needs inputs and targets (prompt/completion, chat or label data)")
        labels = label_order(splits, labels) if schema.kind == "classification" else []
        encoded = {n: self.encode(splits[n]) for n in SPLITS}
        return PreparedData(schema, splits, encoded, labels, stats)

    def encode(self, examples: list[dict], answer: str | None = None) -> list[dict]:
        """Source = the input side, target = the answer (or ``answer`` for label scoring)."""
        tokenizer, max_length = self.tokenizer, self.data.max_length
        items = []
        for e in examples:
            target = answer if answer is not None else e["messages"][-1]["content"]
            labels = tokenizer(text_target=target, truncation=True, max_length=max_length)["input_ids"]
            if not labels or labels[-1] != tokenizer.eos_token_id:
                labels = [*labels[: max_length - 1], tokenizer.eos_token_id]  # the model must learn to stop
            items.append({"input_ids": tokenizer(user_input(e), truncation=True, max_length=max_length)["input_ids"],
                          "labels": labels})
        return items

    def load_model(self, source: str, dtype: str, labels: list[str], **kwargs):
        return load_model(source, "AutoModelForSeq2SeqLM", dtype, **kwargs)

    def batches(self, items: list[dict]) -> PaddedBatches:
        return PaddedBatches(items, self.layout, example_loss)

    def evaluate(self, model, examples: list[dict], encoded: list[dict], labels: list[str]) -> dict:
        loss = self.batches(encoded).mean_loss(model, encoded)
        if not labels:
            return loss_metrics(loss)
        return label_metrics(loss, [e["label"] for e in examples], self.choices(model, examples, labels), labels)

    @torch.no_grad()
    def choices(self, model, examples: list[dict], labels: list[str]) -> list[str]:
        """The label whose answer the model finds likeliest, for each example."""
        was_training = model.training
        model.eval()
        scores = torch.zeros(len(examples), len(labels))
        for k, label in enumerate(labels):
            scoring = self.batches(self.encode(examples, answer=label))
            for rows in scoring.epoch(-1):
                index, sums, _ = scoring.example_losses(model, to_device(scoring.tensors(rows), model))
                scores[index, k] = sums.cpu()
        model.train(was_training)
        return [labels[i] for i in scores.argmin(dim=1).tolist()]

    def samples(self, model, examples: list[dict], labels: list[str], max_new_tokens: int) -> list[dict]:
        return [{"prompt": user_input(e), "expected": e["messages"][-1]["content"],
                 "output": self._generate(model, user_input(e), max_new_tokens)} for e in examples]

    def answer(self, model, prompt: str, labels: list[str], max_new_tokens: int, stream: bool = False) -> str:
        text = self._generate(model, prompt, max_new_tokens)
        if stream:
            print(text)
        return text

    @torch.no_grad()
    def _generate(self, model, text: str, max_new_tokens: int) -> str:
        was_training = model.training
        model.eval()
        enc = self.tokenizer(text, truncation=True, max_length=self.data.max_length, return_tensors="pt")
        out = model.generate(**to_device(dict(enc), model), max_new_tokens=max_new_tokens, do_sample=False)
        model.train(was_training)
        return self.tokenizer.decode(out[0], skip_special_tokens=True).strip()
