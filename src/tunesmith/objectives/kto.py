"""Kahneman-Tversky Optimisation (Ethayarajh et al. 2024): teach a causal LM from single answers
marked good or bad (thumbs), with no pairs: each answer's log-ratio to a fixed reference model is
pushed above a reference point if it is good and below it if it is bad (``preference_losses.kto_loss``).

The reference point ``z`` estimates KL(policy || reference) from mismatched pairs: each example also
carries its prompt followed by another example's completion, chosen once when the data is encoded
(as TRL's ``KTOTrainer`` fixes its ``KL_completion_ids`` when it prepares the data), from an example
with another prompt where there is one. ``z`` is the mean log-ratio of a micro-batch's mismatched
pairs, detached and clamped at 0.

Layout: one row per example, ``[prompt][answer][mismatched answer]``, laid out as dpo lays out a pair
(``dpo.pair_row``: the prompt run once, each answer seeing the prompt and itself), so a step computes
the answer and its mismatched pair in one forward pass. The reference is dpo's, the model training
starts from: the base (the policy with its adapter disabled for LoRA, QLoRA, IA3, or log-probabilities
computed once before training for methods with no adapter to disable, ``dpo.PrecomputedReference``),
or a child's parent, whose log-probabilities are computed once its weights are loaded
(``dpo.Policy.start_from``).

Imbalanced thumbs: the paper asks for ``desirable_weight * good / (undesirable_weight * bad)`` in
``[1, 4/3]`` (``RATIO``). With ``balance: warn`` the weights are used as given and the data statistics
say which weights would bring the ratio in; with ``balance: auto`` the scarcer kind of answer is
weighted up until the ratio is 1 (``balanced_weights``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from tunesmith.data.batching import length_grouped
from tunesmith.data.format import IGNORE, Encoder, EncodeStats
from tunesmith.data.options import DataConfig
from tunesmith.data.pipeline import SPLITS, PreparedData, answer_counts, load_splits
from tunesmith.errors import TunesmithError
from tunesmith.objectives.base import CAUSAL_LM, Abilities, Layout, to_device
from tunesmith.objectives.causal import _token_summary
from tunesmith.objectives.dpo import (
    PolicyObjective,
    PrecomputedReference,
    encoded_items,
    pair_logps,
    pair_row,
    reference_logps,
    stack_rows,
)
from tunesmith.objectives.padded import refuse_canaries
from tunesmith.objectives.preference_losses import kto_loss, kto_reference_point
from tunesmith.options import Section

# The paper's range for desirable_weight * good answers / (undesirable_weight * bad answers).
RATIO = (1.0, 4 / 3)


class Options(Section):
    name: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference: the scale of "
                        "the log-ratio inside the sigmoid.")
    desirable_weight: float = Field(1.0, gt=0, description="The weight of a good answer's loss (lambda_D).")
    undesirable_weight: float = Field(1.0, gt=0, description="The weight of a bad answer's loss (lambda_U).")
    balance: Literal["warn", "auto"] = Field(
        "warn", description="Imbalanced thumbs. warn: the weights as given, and the data statistics say when "
        "desirable_weight * good / (undesirable_weight * bad) is outside the paper's [1, 4/3]; auto: the scarcer "
        "kind of answer weighted up until that ratio is 1, from the training split's counts.")


def weight_ratio(good: int, bad: int, desirable_weight: float, undesirable_weight: float) -> float:
    """``desirable_weight * good / (undesirable_weight * bad)``, what the paper asks to keep in ``RATIO``."""
    return desirable_weight * good / (undesirable_weight * bad) if bad else float("inf")


def balanced_weights(good: int, bad: int, desirable_weight: float, undesirable_weight: float) -> tuple[float, float]:
    """The weights with the scarcer kind of answer weighted up so that ``weight_ratio`` is 1; the given
    weights when one kind is missing (there is nothing to balance)."""
    if not good or not bad:
        return desirable_weight, undesirable_weight
    if desirable_weight * good < undesirable_weight * bad:
        return undesirable_weight * bad / good, undesirable_weight
    return desirable_weight, desirable_weight * good / bad


def weight_advice(good: int, bad: int, desirable_weight: float, undesirable_weight: float) -> str | None:
    """What to set when ``weight_ratio`` is outside the paper's ``RATIO``; None when it is inside."""
    if not good or not bad:
        return f"the training split has no {'good' if not good else 'bad'} answers"
    ratio = weight_ratio(good, bad, desirable_weight, undesirable_weight)
    low, high = RATIO
    if low - 1e-9 <= ratio <= high + 1e-9:
        return None
    if ratio < low:  # good answers weigh too little: raise their weight
        even = undesirable_weight * bad / good
        span = f"objective.desirable_weight between {even * low:.3g} and {even * high:.3g}"
    else:  # bad answers weigh too little: raise theirs
        even = desirable_weight * good / bad
        span = f"objective.undesirable_weight between {even / high:.3g} and {even / low:.3g}"
    return (f"desirable_weight * good / (undesirable_weight * bad) = {ratio:.2f}, outside the paper's [1, 4/3]: "
            f"set {span}, or objective.balance: auto")


def answer_start(labels: list[int]) -> int:
    """Where the last answer starts: the first token of the last run of trained tokens."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE)
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return start


def mismatched_partners(prompts: list[str], seed: int) -> list[int]:
    """For each example, the example whose completion forms its mismatched pair: the next one in a
    seeded cycle through the examples whose prompt differs (the next one at all when every prompt is
    the same; itself when it is alone)."""
    n = len(prompts)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partners = [0] * n
    for k, i in enumerate(order):
        others = [order[(k + s) % n] for s in range(1, n)]
        partners[i] = next((j for j in others if prompts[j] != prompts[i]), others[0] if others else i)
    return partners


def encode_answers(examples: list[dict], encoder: Encoder, stats: EncodeStats,
                   seed: int) -> tuple[list[dict], list[dict]]:
    """``{answer, mismatched, desirable}`` per example, and the examples kept: an example is dropped when
    truncation leaves its answer without a trained token. Only the last answer's tokens are trained
    (earlier assistant turns of a chat prompt are prompt). The mismatched pair is the prompt and the
    partner's completion, cut to ``max_length`` but never below one trained token."""
    parts, kept = [], []
    for ex in examples:
        enc = encoder.encode({"messages": [*ex["messages"], {"role": "assistant", "content": ex["completion"]}],
                              "_where": ex.get("_where")}, stats)
        if enc is not None:
            start = answer_start(enc["labels"])
            parts.append((enc["input_ids"][:start], enc["input_ids"][start:], enc["labels"][start:]))
            kept.append(ex)
    partners = mismatched_partners([e["_input"] for e in kept], seed)
    items = []
    for (prompt, ids, labels), partner, ex in zip(parts, partners, kept):
        other_ids, other_labels = parts[partner][1:]
        room = max(encoder.max_length - len(prompt), 1)
        items.append({"answer": {"input_ids": prompt + ids, "labels": [IGNORE] * len(prompt) + labels},
                      "mismatched": {"input_ids": prompt + other_ids[:room],
                                     "labels": [IGNORE] * len(prompt) + other_labels[:room]},
                      "desirable": ex["desirable"], "prompt_tokens": len(prompt)})
    return items, kept


def as_pair(item: dict) -> dict:
    """An example as dpo's row of two answers after one prompt: the answer, then its mismatched pair."""
    return {"chosen": item["answer"], "rejected": item["mismatched"]}


class AnswerBatches:
    """Answers marked good or bad as the loop sees them: one example per row, rows grouped by length;
    the loss and ``trained_tokens`` count answers."""

    def __init__(self, items: list[dict], layout: Layout, reference: PrecomputedReference | None,
                 options: Options, weights: tuple[float, float]):
        self.items = items
        self.layout = layout
        self.reference = reference
        self.options = options
        self.weights = weights

    def epoch(self, epoch: int) -> list[list[int]]:
        # A row's width: the prompt once, then both answers.
        lengths = [len(i["answer"]["input_ids"]) + len(i["mismatched"]["input_ids"]) - i["prompt_tokens"]
                   for i in self.items]
        return length_grouped(lengths, self.layout.batch_tokens, None if epoch < 0 else self.layout.seed + epoch)

    def tensors(self, rows: list[int]) -> dict[str, torch.Tensor]:
        batch = stack_rows([pair_row(as_pair(self.items[i]), self.layout.pad_id) for i in rows], self.layout.pad_id)
        batch["pairs"] = torch.tensor(rows)  # what dpo's pair_logps counts rows by
        batch["desirable"] = torch.tensor([self.items[i]["desirable"] for i in rows])
        return batch

    def logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy (with gradients) and reference log-probabilities, [answers, 2]: the answer, then its
        mismatched pair."""
        policy = pair_logps(model, batch)
        items = [as_pair(self.items[i]) for i in batch["pairs"].tolist()]
        return policy, reference_logps(model, batch, items, policy, self.reference, self.layout)

    def scored(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each answer's loss and log-ratio, and the micro-batch's reference point (a scalar)."""
        policy, reference = self.logps(model, batch)
        point = kto_reference_point(policy[:, 1], reference[:, 1])
        losses = kto_loss(policy[:, 0], reference[:, 0], batch["desirable"], point, self.options.beta, *self.weights)
        return losses, (policy[:, 0] - reference[:, 0]).detach(), point

    def loss(self, model, batch) -> torch.Tensor:
        return self.scored(model, batch)[0].sum()

    def example_losses(self, model, batch):
        return batch["pairs"], self.scored(model, batch)[0], torch.ones_like(batch["pairs"])

    @staticmethod
    def trained_tokens(batch) -> int:
        return len(batch["pairs"])

    @staticmethod
    def input_tokens(batch) -> int:
        return int((batch["seq_ids"] != -1).sum())

    @torch.no_grad()
    def loss_totals(self, model, items: list[dict]) -> tuple[float, int]:
        return self.figures(model, items)["loss"] * len(items), len(items)

    def figures(self, model, items: list[dict]) -> dict[str, float]:
        """Mean loss; ``accuracy``: the answers on their mark's side of the reference point (a good one's
        log-ratio above it, a bad one's below); ``kl``: the estimate over every mismatched pair, clamped
        at 0; the mean implicit reward (``beta`` times the log-ratio) of good and of bad answers, and
        ``reward_margin``, their difference."""
        view = self if items is self.items else AnswerBatches(items, self.layout, self.reference, self.options,
                                                              self.weights)
        return self.figures_of(view.row_scores(model, view.epoch(-1)))

    @torch.no_grad()
    def row_scores(self, model, batches: list[list[int]]) -> dict[str, torch.Tensor]:
        """Per answer of ``batches`` (of ``epoch(-1)``, in their order), on the CPU: its loss, log-ratio,
        mark and mismatched log-ratio, and the reference point of its batch (which the batch's
        mismatched pairs set: the batches are those of one process, whoever scores them)."""
        was_training = model.training
        model.eval()
        losses, ratios, points, marks, mismatched = [], [], [], [], []
        for rows in batches:
            batch = to_device(self.tensors(rows), model)
            policy, reference = self.logps(model, batch)
            point = kto_reference_point(policy[:, 1], reference[:, 1])
            losses.append(kto_loss(policy[:, 0], reference[:, 0], batch["desirable"], point, self.options.beta,
                                   *self.weights).cpu())
            ratios.append((policy[:, 0] - reference[:, 0]).cpu())
            mismatched.append((policy[:, 1] - reference[:, 1]).cpu())
            points.append(point.cpu().expand(len(rows)))
            marks.append(batch["desirable"].cpu())
        model.train(was_training)
        return {"loss": torch.cat(losses), "ratio": torch.cat(ratios), "point": torch.cat(points),
                "good": torch.cat(marks), "mismatched": torch.cat(mismatched)}

    def figures_of(self, scores: dict[str, torch.Tensor]) -> dict[str, float]:
        """``figures`` from the ``row_scores`` of every answer, in any order."""
        ratio, point, good = scores["ratio"], scores["point"], scores["good"]
        right = torch.where(good, ratio > point, ratio < point)
        figures = {"loss": float(scores["loss"].mean()), "accuracy": float(right.float().mean()),
                   "kl": float(scores["mismatched"].mean().clamp(min=0))}
        rewards = self.options.beta * ratio
        if good.any():
            figures["desirable_reward"] = float(rewards[good].mean())
        if (~good).any():
            figures["undesirable_reward"] = float(rewards[~good].mean())
        if good.any() and (~good).any():
            figures["reward_margin"] = figures["desirable_reward"] - figures["undesirable_reward"]
        return figures


@dataclass
class KTO(PolicyObjective):
    name: ClassVar[str] = "kto"
    Options: ClassVar[type[Section]] = Options
    abilities: ClassVar[Abilities] = Abilities(
        head=CAUSAL_LM, data=("unpaired_preference",), metrics=("loss", "accuracy", "reward_margin"),
        writes_answers=True, batched_answers=True, reference=True, rows_scored=True, traffic_options={"balance": "auto"})
    options: Options
    data: DataConfig
    tokenizer: Any
    layout: Layout

    def __post_init__(self):
        super().__post_init__()
        self.weights = (self.options.desirable_weight, self.options.undesirable_weight)

    @classmethod
    def check_method(cls, method) -> list[str]:
        if not (method.packs and method.direct_decoder):
            return [f"method.name: {method.name} cannot train objective kto: an answer and its mismatched pair "
                    "share one row after their prompt (use lora, qlora, ia3, adapter or full)"]
        return []

    def prepare(self, labels: list[str] | None = None) -> PreparedData:  # unpaired answers have no labels
        refuse_canaries(self.name, self.data)
        splits, schema, stats = load_splits(self.data)
        if schema.kind != "unpaired_preference":
            hint = "; preference pairs train objective dpo" if schema.kind == "preference" else ""
            raise TunesmithError(f"objective kto needs unpaired preference data (prompt, completion and whether it "
                                 f"is good), but the data is {schema.kind}: name the columns under data.columns.prompt "
                                 f"/ .completion / .desirable{hint}")
        encoded, stats["tokens"] = {}, {}
        for name in SPLITS:
            es = EncodeStats()
            encoded[name], splits[name] = encode_answers(splits[name], self.encoder, es, self.data.seed)
            stats["tokens"][name] = _token_summary(es)
        counts = answer_counts(splits["train"])
        self.weights, stats["notes"] = self._weights(counts["good"], counts["bad"])
        self.prepared = PreparedData(schema, splits, encoded, [], stats)
        return self.prepared

    def _weights(self, good: int, bad: int) -> tuple[tuple[float, float], list[str]]:
        """The loss weights for ``good`` and ``bad`` training answers, and the line the statistics show."""
        o = self.options
        weights = (o.desirable_weight, o.undesirable_weight)
        if o.balance == "auto":
            weights = balanced_weights(good, bad, *weights)
        line = (f"kto weights: desirable {weights[0]:.4g}, undesirable {weights[1]:.4g} "
                f"({'balanced' if o.balance == 'auto' else 'as given'}, on {good} good and {bad} bad training answers)")
        advice = weight_advice(good, bad, *weights)
        return weights, [line + (f"; warning: {advice}" if advice else "")]

    def load_model(self, source: str, dtype: str, labels: list[str], **kwargs):
        return self.policy.load_model(source, dtype, lambda: [as_pair(i) for i in encoded_items(self.prepared)],
                                      **kwargs)

    def batches(self, items: list[dict]) -> AnswerBatches:
        return AnswerBatches(items, self.layout, self.reference, self.options, self.weights)

    def evaluate(self, model, examples: list[dict], encoded: list[dict], labels: list[str]) -> dict:
        """``loss``, ``accuracy``, ``kl``, ``desirable_reward``, ``undesirable_reward`` and
        ``reward_margin`` (``AnswerBatches.figures``)."""
        return self.batches(encoded).figures(model, encoded)

    def samples(self, model, examples: list[dict], labels: list[str], max_new_tokens: int) -> list[dict]:
        def expected(ex: dict) -> str:
            return f"[{'good' if ex['desirable'] else 'bad'}] {ex['completion']}"

        return self.policy.samples(model, examples, expected, max_new_tokens)

