"""Sequence classification: a classification head on an encoder (BERT-style) or a decoder.

The head reads the user's raw text, not the instruction prompt (a head needs no instructions);
the loss is cross-entropy per example, averaged over examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from tunesmith.data.options import DataConfig
from tunesmith.data.pipeline import SPLITS, PreparedData, label_order, load_splits
from tunesmith.errors import TunesmithError
from tunesmith.eval.classification import LabelScores
from tunesmith.model import load_model
from tunesmith.objectives.base import SEQUENCE_CLASSIFIER, Abilities, Layout, to_device
from tunesmith.objectives.padded import (
    PaddedBatches,
    prompt_learning_is_causal_only,
    refuse_canaries,
    user_input,
)
from tunesmith.options import Section


class Options(Section):
    name: Literal["classification"] = "classification"


def example_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
    return losses, torch.ones_like(batch["labels"])


@dataclass
class Classification:
    name: ClassVar[str] = "classification"
    Options: ClassVar[type[Section]] = Options
    abilities: ClassVar[Abilities] = Abilities(
        head=SEQUENCE_CLASSIFIER, data=("classification",),
        metrics=("loss", "perplexity", "accuracy", "macro_f1"), scores="label")
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
        if schema.kind != "classification":
            raise TunesmithError(
                f"objective classification needs text/label data, but the data is {schema.kind}: "
                "name the label column under data.columns.label"
            )
        labels = label_order(splits, labels)  # the head's targets are indices into these
        encoded = {n: self.encode(splits[n], labels) for n in SPLITS}
        return PreparedData(schema, splits, encoded, labels, stats)

    def encode(self, examples: list[dict], labels: list[str]) -> list[dict]:
        index = {label: i for i, label in enumerate(labels)}
        return [{"input_ids": self._ids(e["_input"]), "label": index[e["label"]]} for e in examples]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, truncation=True, max_length=self.data.max_length)["input_ids"]

    def load_model(self, source: str, dtype: str, labels: list[str], **kwargs):
        model = load_model(source, "AutoModelForSequenceClassification", dtype, num_labels=len(labels),
                           id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
                           **kwargs)
        if model.config.pad_token_id is None:
            # Decoders classify from the last non-padding token, which they find through the pad id.
            model.config.pad_token_id = model.config.eos_token_id
        return model

    def batches(self, items: list[dict]) -> PaddedBatches:
        return PaddedBatches(items, self.layout, example_loss)

    def evaluate(self, model, examples: list[dict], encoded: list[dict], labels: list[str]) -> dict:
        return self.label_scores(model, examples, encoded, labels).metrics(examples, labels)

    @torch.no_grad()
    def label_scores(self, model, examples: list[dict], encoded: list[dict], labels: list[str]) -> LabelScores:
        """The head's softmax for each example, and the mean loss."""
        was_training = model.training
        model.eval()
        batches = self.batches(encoded)
        probabilities = np.zeros((len(encoded), len(labels)))
        for rows in batches.epoch(-1):
            batch = to_device(batches.tensors(rows), model)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            probabilities[rows] = torch.softmax(logits.double(), dim=-1).cpu().numpy()
        total, count = batches.loss_totals(model, encoded)
        model.train(was_training)
        return LabelScores(total / max(count, 1), probabilities, weight=count)

    @torch.no_grad()
    def label_logits(self, model, texts: list[str], labels: list[str]) -> torch.Tensor:
        """[texts, labels]: the head's logits for each raw text, read one text at a time (no padding
        for a decoder's head to find its way past)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        logits = torch.cat([model(input_ids=torch.tensor([self._ids(t)], device=device)).logits.float().cpu()
                            for t in texts])
        model.train(was_training)
        return logits

    def label_probabilities(self, model, texts: list[str], labels: list[str]) -> torch.Tensor:
        """[texts, labels]: the head's softmax for each raw text (the bias probe compares these across a pair)."""
        return torch.softmax(self.label_logits(model, texts, labels), dim=-1)

    def samples(self, model, examples: list[dict], labels: list[str], max_new_tokens: int) -> list[dict]:
        return [{"prompt": user_input(e), "expected": e["label"], "output": self._predict(model, e["_input"], labels)}
                for e in examples]

    def answer(self, model, prompt: str, labels: list[str], max_new_tokens: int, stream: bool = False) -> str:
        label = self._predict(model, prompt, labels)
        if stream:
            print(label)
        return label

    @torch.no_grad()
    def _predict(self, model, text: str, labels: list[str]) -> str:
        was_training = model.training
        model.eval()
        ids = torch.tensor([self._ids(text)], device=next(model.parameters()).device)
        label = labels[int(model(input_ids=ids).logits.argmax(-1))]
        model.train(was_training)
        return label
