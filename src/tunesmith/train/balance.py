"""Class-balanced sampling of the training split (``data.balance``), on the loop's sampler seam.

Each epoch draws as many items as the split holds, with replacement, each item weighted by its
label's count to the power ``-1`` (``class``: every label equally often) or ``-1/2`` (``sqrt``: between
the data's own shares and equal ones). Items without a label (canaries, replayed rows) keep their
share of the epoch. The objective's own batching lays each draw out (``train.drawn``).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from tunesmith.errors import TunesmithError
from tunesmith.objectives.base import Batches
from tunesmith.train.drawn import DrawnBatches

POWERS = {"class": -1.0, "sqrt": -0.5}


def balance_weights(labels: list[str | None], mode: str) -> list[float]:
    """Each item's weight in the draw; ``labels[i]`` is item i's label, or None."""
    counts = Counter(label for label in labels if label is not None)
    if not counts:
        raise TunesmithError(f"data.balance: {mode} needs label data (data.format classification); the training "
                             "split has no labels")
    raw = {label: count ** POWERS[mode] for label, count in counts.items()}
    labelled = sum(counts.values())
    scale = labelled / sum(raw[label] * count for label, count in counts.items())
    # Labelled items keep their total weight (one each, as unlabelled ones), shared out by label.
    return [1.0 if label is None else raw[label] * scale for label in labels]


def item_labels(examples: list[dict], items: int) -> list[str | None]:
    """The label of each of ``items`` training items, encoded from ``examples`` in order; items past
    the examples (replayed from a parent run) have none."""
    return [e.get("label") for e in examples[:items]] + [None] * max(0, items - len(examples))


def check_balance(config, labels: list[str]) -> None:
    """Whether ``data.balance`` can sample this run's training split (``config``: a ``RunConfig``;
    ``labels``: the prepared data's), before anything is written."""
    mode = config.data.balance
    if mode == "none":
        return
    problems = [f"data.balance: {mode} and {what} both choose the training rows; keep one"
                for what, on in (("train.curriculum", config.train.curriculum), ("privacy", config.privacy)) if on]
    if not labels:
        problems.append(f"data.balance: {mode} needs label data (data.format classification); this data has no labels")
    if problems:
        raise TunesmithError(*problems)


def balanced_batches(items: list[dict], view: Callable[[list[dict]], Batches], labels: list[str | None],
                     mode: str, seed: int) -> DrawnBatches:
    """The objective's batches over ``items``, each epoch a seeded weighted draw of ``len(items)``."""
    weights = balance_weights(labels, mode)
    population = range(len(items))

    def draw(epoch: int) -> list[list[int]]:
        rng = random.Random(seed * 1_000_003 + epoch)
        return [rng.choices(population, weights=weights, k=len(items))]

    return DrawnBatches(items, view, draw)
