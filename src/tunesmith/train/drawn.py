"""Training batches on items drawn anew each epoch: the sampler seam (``Batches.epoch``) that the
curriculum (``train.curriculum``) and class-balanced sampling (``train.balance``) plug into.

Each epoch, ``draw`` picks item indices in one or more stages (an index may come more than once), and
the objective's own batching (``view``) lays each stage out in micro-batches. Losses, token counts
and validation go to the view of all the items.
"""

from __future__ import annotations

from collections.abc import Callable

from tunesmith.objectives.base import Batches


class DrawnBatches:
    """A plan entry is ``(stage view, micro-batch)``; ``epoch < 0`` is every item once, in a fixed order."""

    def __init__(self, items: list[dict], view: Callable[[list[dict]], Batches],
                 draw: Callable[[int], list[list[int]]]):
        self.items = items
        self.view = view
        self.full = view(items)
        self.stages = draw

    def epoch(self, epoch: int):
        if epoch < 0:
            return [(self.full, rows) for rows in self.full.epoch(-1)]
        plan = []
        for k, stage in enumerate(self.stages(epoch)):
            view = self.view([self.items[i] for i in stage])
            plan += [(view, rows) for rows in view.epoch(epoch * 1_000 + k)]
        return plan

    def tensors(self, entry):
        view, rows = entry
        return view.tensors(rows)

    def loss(self, model, batch):
        return self.full.loss(model, batch)

    def example_losses(self, model, batch):
        return self.full.example_losses(model, batch)

    def trained_tokens(self, batch) -> int:
        return self.full.trained_tokens(batch)

    def input_tokens(self, batch) -> int:
        # With a shared prefix, a stage may share a longer one than all the items do: tokens/s then
        # undercounts a little. Nothing trained depends on it.
        return self.full.input_tokens(batch)

    def loss_totals(self, model, items: list[dict]) -> tuple[float, int]:
        return self.full.loss_totals(model, items)
