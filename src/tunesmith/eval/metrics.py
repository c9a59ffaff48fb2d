"""Metrics on held-out data, computed the same way for every objective, base and tuned model alike."""

from __future__ import annotations

import math
from dataclasses import dataclass


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50))


def macro_f1(gold: list[str], pred: list[str], labels: list[str]) -> float:
    scores = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def loss_metrics(loss: float) -> dict[str, float]:
    return {"loss": loss, "perplexity": perplexity(loss)}


def label_metrics(loss: float, gold: list[str], pred: list[str], labels: list[str]) -> dict[str, float]:
    """Loss, perplexity, accuracy and macro-F1 of predicted labels."""
    return {**loss_metrics(loss), "accuracy": sum(g == p for g, p in zip(gold, pred)) / len(gold),
            "macro_f1": macro_f1(gold, pred, labels)}


@dataclass(frozen=True)
class Metric:
    """A held-out metric that objectives report: how the report names it and which way is better."""

    label: str
    higher_is_better: bool
    key: bool = False  # a column of the runs table (``tunesmith runs list``, the UI)


# The one table of metrics, read by the report, the search (its direction), the gate, the runs
# table and the UI. An objective names the ones its ``evaluate`` returns (``Abilities.metrics``).
METRICS = {
    "loss": Metric("loss", higher_is_better=False, key=True),
    "perplexity": Metric("perplexity", higher_is_better=False),
    "accuracy": Metric("accuracy", higher_is_better=True, key=True),
    "macro_f1": Metric("macro-F1", higher_is_better=True, key=True),
    # Preference objectives (dpo, kto, reward): the mean reward of the good answer minus the bad one's.
    "reward_margin": Metric("reward margin", higher_is_better=True),
}
