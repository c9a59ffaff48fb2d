"""Poisson sampling: every logical batch takes each training example independently, with
probability q = expected_batch_size / N.

DP-SGD's accounting (privacy amplification by subsampling) assumes this sampling; a shuffled
epoch of fixed-size batches would need another analysis. One logical batch is one optimizer step.
Its examples are laid out in micro-batches within ``train.batch_tokens`` by the objective's own
batching, so how a batch is split decides the memory a step needs, never its noise.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from tunesmith.errors import TunesmithError
from tunesmith.objectives.base import Batches


class PoissonBatches:
    """The ``Batches`` of private training: a plan entry is one logical batch (example indices).

    ``view`` is the objective's ``batches``: it lays out any list of encoded items in micro-batches,
    one example per row. A logical batch's tensors hold all its micro-batches, keyed
    ``"{k}/{name}"``; ``micro_batches`` splits them apart again. Example indices inside them
    (``seq_ids``, ``example``) count within the logical batch.
    """

    def __init__(self, items: list[dict], view: Callable[[list[dict]], Batches], expected_batch_size: int,
                 seed: int):
        if expected_batch_size > len(items):
            raise TunesmithError(f"privacy.expected_batch_size: {expected_batch_size} is more than the "
                                 f"{len(items)} training examples")
        self.items = items
        self.view = view
        self.full = view(items)
        self.sample_rate = expected_batch_size / len(items)
        self.steps_per_epoch = max(1, round(len(items) / expected_batch_size))
        self.seed = seed

    def epoch(self, epoch: int) -> list[list[int]]:
        """The logical batches of ``epoch`` (an epoch is N / expected_batch_size steps; ``epoch < 0``
        gives epoch 0)."""
        first = max(epoch, 0) * self.steps_per_epoch
        return [self.draw(first + i) for i in range(self.steps_per_epoch)]

    def draw(self, step: int) -> list[int]:
        """The examples of optimizer step ``step``: each with probability q, seeded by the run's seed
        and the step, so that a resumed run draws the same batches."""
        rng = np.random.default_rng([self.seed % 2**63, step])
        # A Binomial(N, q) count of uniformly chosen examples is the same distribution as N
        # independent coin flips, without drawing N numbers per step.
        size = rng.binomial(len(self.items), self.sample_rate)
        return sorted(rng.choice(len(self.items), size, replace=False).tolist())

    def tensors(self, examples: list[int]) -> dict[str, torch.Tensor]:
        view = self.view([self.items[i] for i in examples])
        out = {}
        for k, plan in enumerate(view.epoch(-1)):
            out.update({f"{k}/{name}": t for name, t in view.tensors(plan).items()})
        return out

    @staticmethod
    def micro_batches(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of a logical batch's tensors, in order (none for an empty batch)."""
        micro: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in batch.items():
            k, name = key.split("/", 1)
            micro.setdefault(int(k), {})[name] = tensor
        return [micro[k] for k in sorted(micro)]

    def loss(self, model, batch) -> torch.Tensor:
        losses = [self.full.loss(model, m) for m in self.micro_batches(batch)]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def example_losses(self, model, batch):
        parts = [self.full.example_losses(model, m) for m in self.micro_batches(batch)]
        if not parts:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return tuple(torch.cat(column) for column in zip(*parts))

    def row_loss(self, model, row):
        return self.full.row_loss(model, row)

    def trained_tokens(self, batch) -> int:
        return sum(self.full.trained_tokens(m) for m in self.micro_batches(batch))

    def input_tokens(self, batch) -> int:
        return sum(self.full.input_tokens(m) for m in self.micro_batches(batch))

    def loss_totals(self, model, items: list[dict]) -> tuple[float, int]:
        return self.full.loss_totals(model, items)
