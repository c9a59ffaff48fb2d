"""Curriculum learning (``train.curriculum``): easy examples first, on the loop's sampler seam.

Examples are ranked by a difficulty score: their length in tokens, or the base model's loss per
trained token on them (``base_loss``: computed once, before the method is applied, and cached in the
run directory). Training is paced as in competence-based curricula (Platanios et al., 2019): at
progress ``t`` through the planned training, examples are drawn from the easiest ``pace(t)``
fraction, which grows from ``start`` to 1 at ``until``. Each epoch is cut into ``stages``; a stage
draws its share of the epoch from its pool, preferring examples not yet drawn in that epoch, and
the objective's own batching lays the stage out in micro-batches.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import torch

from tunesmith.objectives.base import Batches, to_device
from tunesmith.train.drawn import DrawnBatches
from tunesmith.train.loop import planned_steps, steps_per_epoch
from tunesmith.train.options import CurriculumConfig, TrainConfig


def pace(cfg: CurriculumConfig, progress: float) -> float:
    """The fraction of the data (easiest first) drawn from at ``progress`` (0..1) of the training."""
    reached = min(1.0, max(0.0, progress) / cfg.until)
    grown = reached if cfg.pacing == "linear" else math.sqrt(reached)
    return cfg.start + (1 - cfg.start) * grown


def length_scores(items: list[dict]) -> list[float]:
    return [float(len(item["input_ids"])) for item in items]


@torch.no_grad()
def loss_scores(model, batches: Batches) -> list[float]:
    """Each training item's mean loss per trained token under ``model`` (``batches`` holds the items)."""
    was_training = model.training
    model.eval()
    sums, counts = {}, {}
    for rows in batches.epoch(-1):
        index, total, count = batches.example_losses(model, to_device(batches.tensors(rows), model))
        for i, s, n in zip(index.tolist(), total.tolist(), count.tolist()):
            sums[i], counts[i] = sums.get(i, 0.0) + s, counts.get(i, 0) + n
    model.train(was_training)
    return [sums[i] / max(counts[i], 1) for i in range(len(sums))]


class CurriculumBatches(DrawnBatches):
    """The objective's batches, each epoch's plan drawn easy first by the pacing schedule, one stage
    of the epoch at a time (``DrawnBatches``)."""

    def __init__(self, items: list[dict], view: Callable[[list[dict]], Batches], scores: list[float],
                 cfg: CurriculumConfig, seed: int, epochs_planned: float):
        super().__init__(items, view, self.draw)
        self.easy_first = sorted(range(len(items)), key=lambda i: (scores[i], i))
        self.cfg = cfg
        self.seed = seed
        self.epochs_planned = epochs_planned

    def draw(self, epoch: int) -> list[list[int]]:
        """The item indices of each stage of ``epoch``, seeded by the run's seed and the epoch."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        n, stages = len(self.items), min(self.cfg.stages, len(self.items))
        used: set[int] = set()
        drawn = []
        for k in range(stages):
            size = (k + 1) * n // stages - k * n // stages
            pool = self.easy_first[: math.ceil(pace(self.cfg, (epoch + k / stages) / self.epochs_planned) * n)]
            fresh = [i for i in pool if i not in used]
            take = rng.sample(fresh, min(size, len(fresh)))
            take += rng.choices(pool, k=size - len(take))  # a small pool is drawn again
            used.update(take)
            drawn.append(take)
        return drawn


def difficulty(cfg: CurriculumConfig, items: list[dict], view: Callable[[list[dict]], Batches], model,
               cache: Path, write: bool = True) -> list[float]:
    """Each training item's difficulty score; base-model losses are read from ``cache`` when there
    (a resumed run), else computed with ``model`` (the base, before the method) and written there."""
    if cfg.by == "length":
        return length_scores(items)
    if cache.is_file():
        scores = json.loads(cache.read_text())
        if len(scores) == len(items):
            return scores
    scores = loss_scores(model, view(items))
    if write:
        cache.write_text(json.dumps(scores))
    return scores


def curriculum_batches(items: list[dict], view: Callable[[list[dict]], Batches], scores: list[float],
                       cfg: TrainConfig, processes: int) -> CurriculumBatches:
    """``CurriculumBatches`` paced over the training ``cfg`` plans (epochs, or max_steps)."""
    full = view(items)
    epochs = planned_steps(full, cfg, processes) / steps_per_epoch(full, cfg, processes)
    return CurriculumBatches(items, view, scores, cfg.curriculum, cfg.seed, epochs)
