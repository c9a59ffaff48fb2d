"""Metrics on held-out data, computed the same way for every objective, base and tuned model alike."""

from __future__ import annotations

import math


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
