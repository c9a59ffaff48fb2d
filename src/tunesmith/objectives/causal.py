"""Causal language modelling: supervised fine-tuning (prompt/completion, chat, label answers) and
continued pre-training (plain text, every token trained).

Training batches are packed rows (``data.batching``) whose loss is computed only at labelled
positions (``objectives.lm_loss``). Label data is scored by the log-likelihood of every label
string after each prompt, the prompt run once for all of them (``eval.choices``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from tunesmith.data.batching import collate, collate_shared, plan_batches, shared_prefix
from tunesmith.data.format import IGNORE, Encoder, EncodeStats
from tunesmith.data.options import DataConfig
from tunesmith.data.pipeline import SPLITS, PreparedData, label_order, load_splits
from tunesmith.errors import TunesmithError
from tunesmith.eval.choices import score_choices
from tunesmith.eval.classification import LabelScores
from tunesmith.eval.metrics import loss_metrics
from tunesmith.model import load_model
from tunesmith.objectives.base import CAUSAL_LM, Abilities, Layout, to_device
from tunesmith.objectives.lm_loss import example_losses, loss_sum, row_loss
from tunesmith.options import Section


class Options(Section):
    name: Literal["causal"] = "causal"


class PackedBatches:
    """The micro-batches of a causal LM training set, reshuffled each epoch with a seeded order.

    Packed rows by default; ``layout.one_per_row`` gives length-grouped batches of one example per
    row, right-padded (``train.packing: false``, or a method that cannot pack).
    """

    def __init__(self, examples: list[dict], layout: Layout):
        self.examples = examples
        self.layout = layout
        # Only the label-only path runs the decoder with our own mask; prompt learning cannot pack.
        shares = layout.shared_prefix and layout.direct and not layout.one_per_row
        self.prefix = shared_prefix(examples) if shares else 0

    def epoch(self, epoch: int) -> list[list[list[int]]]:
        seed = None if epoch < 0 else self.layout.seed + epoch
        return plan_batches(self.examples, self.layout.batch_tokens, self.layout.row_len, seed,
                            self.layout.one_per_row, self.prefix)

    def tensors(self, rows) -> dict[str, torch.Tensor]:
        if self.prefix:
            return collate_shared(self.examples, rows, self.layout.row_len, self.layout.pad_id, self.prefix)
        return collate(self.examples, rows, self.layout.row_len, self.layout.pad_id)

    def loss(self, model, batch) -> torch.Tensor:
        return loss_sum(model, batch, self.layout.direct)[0]

    def example_losses(self, model, batch):
        return example_losses(model, batch, self.layout.direct)

    def row_loss(self, model, row):
        return row_loss(model, row, self.layout.direct)

    @staticmethod
    def trained_tokens(batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def input_tokens(self, batch) -> int:
        """The examples' tokens, a shared prefix counted once per example: what the batch stands for,
        so that tokens/s compares with tools that compute the prefix again for every example."""
        seq = batch["seq_ids"]
        return int((seq >= 0).sum()) + self.prefix * int(torch.unique(seq[seq >= 0]).numel())

    @torch.no_grad()
    def loss_totals(self, model, items: list[dict]) -> tuple[float, int]:
        was_training = model.training
        model.eval()
        # The batches' own items keep their plan (and shared prefix), worked out once.
        view = self if items is self.examples else PackedBatches(items, self.layout)
        total, count = 0.0, 0
        for rows in view.epoch(-1):
            s, n = loss_sum(model, to_device(view.tensors(rows), model), self.layout.direct)
            total, count = total + s.item(), count + n
        model.train(was_training)
        return total, count

    def mean_loss(self, model, items: list[dict]) -> float:
        """Mean loss per trained token over ``items``."""
        total, count = self.loss_totals(model, items)
        return total / max(count, 1)


@dataclass
class Causal:
    name: ClassVar[str] = "causal"
    Options: ClassVar[type[Section]] = Options
    abilities: ClassVar[Abilities] = Abilities(
        head=CAUSAL_LM, data=("prompt_completion", "chat", "text", "classification"),
        metrics=("loss", "perplexity", "accuracy", "macro_f1"), writes_answers=True, batched_answers=True,
        scores="label", mixes_sources=True, loss_scored=True)
    options: Options
    data: DataConfig
    tokenizer: Any
    layout: Layout

    def __post_init__(self):
        self.encoder = Encoder(self.tokenizer, self.data.template, self.data.system_prompt, self.data.max_length)

    @classmethod
    def check_method(cls, method) -> list[str]:
        return []

    def prepare(self, labels: list[str] | None = None) -> PreparedData:
        splits, schema, stats = load_splits(self.data)
        if schema.kind == "preference":
            raise TunesmithError("objective causal trains on one answer per prompt, but the data is preference "
                                 "pairs: use objective.name: dpo (or reward)")
        if schema.kind == "unpaired_preference":
            raise TunesmithError("objective causal trains on answers to imitate, but the data marks answers good "
                                 "or bad: use objective.name: kto")
        encoded, stats["tokens"] = encode_splits(splits, self.encoder)
        # Canaries (data.canaries) join label data as prompt/completion pairs, without a label.
        labels = label_order(splits, labels) if schema.kind == "classification" else []
        return PreparedData(schema, splits, encoded, labels, stats)

    def load_model(self, source: str, dtype: str, labels: list[str], **kwargs):
        return load_model(source, "AutoModelForCausalLM", dtype, **kwargs)

    def batches(self, items: list[dict]) -> PackedBatches:
        return PackedBatches(items, self.layout)

    def evaluate(self, model, examples: list[dict], encoded: list[dict], labels: list[str]) -> dict:
        """``loss`` and ``perplexity`` always; ``accuracy`` and ``macro_f1`` when there are labels
        (``label_scores``)."""
        if not labels:
            return loss_metrics(self.batches(encoded).mean_loss(model, encoded))
        return self.label_scores(model, examples, encoded, labels).metrics(examples, labels)

    def encode(self, examples: list[dict], labels: list[str]) -> list[dict]:
        """Nothing: ``label_scores`` frames each label as the answer to an example itself."""
        return []

    def label_scores(self, model, examples: list[dict], encoded: list[dict], labels: list[str]) -> LabelScores:
        """Each label string's share of the labels' total likelihood as the answer to each example; the
        model's choice is the most likely. The loss comes from the same forward passes (the gold
        label's answer), not from a second pass."""
        sums, counts = score_labels(model, self.encoder, examples, labels, self.layout)
        gold_index = torch.tensor([labels.index(e["label"]) for e in examples]).unsqueeze(1)
        tokens = counts.gather(1, gold_index).sum()
        loss = float(sums.gather(1, gold_index).sum() / tokens)
        return LabelScores(loss, torch.softmax(-sums.double(), dim=1).numpy(), weight=float(tokens))

    def label_logits(self, model, texts: list[str], labels: list[str]) -> torch.Tensor:
        """[texts, labels]: each label's log-likelihood as the answer to the instruction the run
        trained with, around each text."""
        examples = [{"messages": [{"role": "user", "content": self.data.instruction.format(text=t)},
                                  {"role": "assistant", "content": ""}]} for t in texts]
        sums, _ = score_labels(model, self.encoder, examples, labels, self.layout)
        return -sums.float()

    def label_probabilities(self, model, texts: list[str], labels: list[str]) -> torch.Tensor:
        """[texts, labels]: each label's share of the labels' total likelihood (``label_logits``; the
        bias probe compares these across a pair)."""
        return torch.softmax(self.label_logits(model, texts, labels), dim=1)

    @torch.no_grad()
    def samples(self, model, examples: list[dict], labels: list[str], max_new_tokens: int) -> list[dict]:
        """Greedy completions for a few held-out prompts."""
        samples = []
        was_training = model.training
        model.eval()
        for ex in examples:
            if "messages" in ex:
                prompt = self.encoder.prompt_text(ex)
                shown = next(m["content"] for m in reversed(ex["messages"]) if m["role"] != "assistant")
                expected = ex["messages"][-1]["content"] if ex["messages"][-1]["role"] == "assistant" else ""
            else:
                words = ex["text"].split()
                prompt, expected = " ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2 :])
                shown = prompt
            samples.append({"prompt": shown, "expected": expected,
                            "output": self._generate(model, prompt, max_new_tokens).strip()})
        model.train(was_training)
        return samples

    def answer(self, model, prompt: str, labels: list[str], max_new_tokens: int, stream: bool = False) -> str:
        return self._generate(model, self._framed(prompt, labels), max_new_tokens, stream)

    def answers(self, model, prompts: list[str], labels: list[str], max_new_tokens: int) -> list[str]:
        """``answer`` to several prompts at once, as one greedy batch (``tunesmith predict``)."""
        return greedy_answers(model, self.tokenizer, [self._framed(p, labels) for p in prompts], max_new_tokens)

    def _framed(self, prompt: str, labels: list[str]) -> str:
        # A model tuned on label data answers the instruction it was trained with.
        text = self.data.instruction.format(text=prompt) if labels else prompt
        return self.encoder.prompt_text({"messages": [{"role": "user", "content": text}]})

    def _generate(self, model, text: str, max_new_tokens: int, stream: bool = False) -> str:
        return greedy_answer(model, self.tokenizer, text, max_new_tokens, stream)


@torch.no_grad()
def greedy_answer(model, tokenizer, text: str, max_new_tokens: int, stream: bool = False) -> str:
    """The greedy continuation of ``text`` (a prompt already framed), printed as it grows with ``stream``."""
    from transformers import TextStreamer

    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, streamer=streamer)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def greedy_answers(model, tokenizer, texts: list[str], max_new_tokens: int) -> list[str]:
    """The greedy continuation of each of ``texts`` (prompts already framed), decoded together: the rows
    are padded on the left, and generate takes each row's positions from its attention mask."""
    rows = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def encode_splits(splits: dict[str, list[dict]], encoder: Encoder) -> tuple[dict[str, list[dict]], dict]:
    """Token ids and labels per split, and token statistics. Examples that truncation left without
    a trained token are dropped from ``splits`` too, so examples and encodings stay aligned."""
    encoded, token_stats = {}, {}
    for name in SPLITS:
        es = EncodeStats()
        encoded[name], kept = [], []
        for ex in splits[name]:
            if "text" in ex:
                items, keep = encoder.encode_text(ex, es), True
            else:
                items = [item] if (item := encoder.encode(ex, es)) is not None else []
                keep = bool(items)
            if keep:
                kept.append(ex)
            if "_source" in ex:  # mixed data (data.sources): each source is scored on its own
                for item in items:
                    item["_source"] = ex["_source"]
            encoded[name] += items
        splits[name] = kept
        token_stats[name] = _token_summary(es)
    return encoded, token_stats


def _token_summary(es: EncodeStats) -> dict:
    if not es.lengths:
        return {"examples": 0}
    p = np.percentile(es.lengths, [50, 90, 99])
    return {
        "examples": es.examples,
        "total": int(sum(es.lengths)),
        "p50": int(p[0]), "p90": int(p[1]), "p99": int(p[2]), "max": int(max(es.lengths)),
        "truncated": es.truncated,
        "completion_tokens_lost": es.completion_tokens_lost,
        "dropped_no_trained_token": es.dropped_no_trained_token,
        "split_into_blocks": es.split_into_blocks,
    }


def with_answer(example: dict, answer: str) -> dict:
    messages = [*example["messages"][:-1], {"role": "assistant", "content": answer}]
    return {**example, "messages": messages}


@torch.no_grad()
def score_labels(model, encoder: Encoder, examples: list[dict], labels: list[str],
                 layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and trained-token count of every (example, label) answer, each [examples, labels]."""
    choices = [[encoder.encode(with_answer(ex, label)) for label in labels] for ex in examples]
    counts = torch.tensor([[sum(t != IGNORE for t in c["labels"][1:]) for c in group] for group in choices])
    was_training = model.training
    model.eval()
    if layout.direct:
        totals = score_choices(model, choices, layout.batch_tokens, layout.row_len)
    else:
        candidates = [c for group in choices for c in group]
        totals = torch.zeros(len(candidates))
        view = PackedBatches(candidates, layout)
        for rows in view.epoch(-1):
            index, sums, _ = view.example_losses(model, to_device(view.tensors(rows), model))
            totals.index_add_(0, index.cpu(), sums.cpu())
        totals = totals.view(len(examples), len(labels))
    model.train(was_training)
    return totals, counts

