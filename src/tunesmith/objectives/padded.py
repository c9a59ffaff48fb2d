"""Length-grouped, right-padded batches, for objectives whose examples cannot share a row
(encoders attend both ways, so packing would need per-example masks; grouping by length keeps
padding small). The objective supplies the loss; this module only lays out the batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tunesmith.data.batching import length_grouped, pad
from tunesmith.data.format import IGNORE
from tunesmith.errors import TunesmithError
from tunesmith.objectives.base import Layout, to_device

# (model, batch) -> (per-example summed losses [B], per-example counts [B]), losses in the graph.
ExampleLoss = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


class PaddedBatches:
    """Items of ``input_ids`` and a target: ``label`` (an index) or ``labels`` (token ids)."""

    def __init__(self, items: list[dict], layout: Layout, example_loss: ExampleLoss):
        self.items = items
        self.layout = layout
        self.example_loss = example_loss

    def epoch(self, epoch: int) -> list[list[int]]:
        lengths = [len(x["input_ids"]) + len(x.get("labels") or []) for x in self.items]
        return length_grouped(lengths, self.layout.batch_tokens, None if epoch < 0 else self.layout.seed + epoch)

    def tensors(self, rows: list[int]) -> dict[str, torch.Tensor]:
        chosen = [self.items[i] for i in rows]
        batch = {"input_ids": pad([x["input_ids"] for x in chosen], self.layout.pad_id),
                 "attention_mask": pad([[1] * len(x["input_ids"]) for x in chosen], 0),
                 "example": torch.tensor(rows)}
        if "label" in chosen[0]:
            batch["labels"] = torch.tensor([x["label"] for x in chosen])
        else:
            batch["labels"] = pad([x["labels"] for x in chosen], IGNORE)
        return batch

    def loss(self, model, batch) -> torch.Tensor:
        return self.example_loss(model, batch)[0].sum()

    def example_losses(self, model, batch):
        sums, counts = self.example_loss(model, batch)
        return batch["example"], sums, counts

    @staticmethod
    def trained_tokens(batch) -> int:
        """What the loss is averaged over: examples (class labels) or target tokens."""
        labels = batch["labels"]
        return len(labels) if labels.ndim == 1 else int((labels != IGNORE).sum())

    @staticmethod
    def input_tokens(batch) -> int:
        return int(batch["attention_mask"].sum())

    @torch.no_grad()
    def loss_totals(self, model, items: list[dict]) -> tuple[float, int]:
        # The batches' own items need no second view.
        view = self if items is self.items else PaddedBatches(items, self.layout, self.example_loss)
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for rows in view.epoch(-1):
            batch = to_device(view.tensors(rows), model)
            total += view.loss(model, batch).item()
            count += view.trained_tokens(batch)
        model.train(was_training)
        return total, count

    def mean_loss(self, model, items: list[dict]) -> float:
        total, count = self.loss_totals(model, items)
        return total / max(count, 1)


def user_input(example: dict) -> str:
    """The input side of a canonical example: its text, or its non-assistant messages."""
    if "text" in example:
        return example["text"]
    return "\n".join(m["content"] for m in example["messages"] if m["role"] != "assistant")


def prompt_learning_is_causal_only(objective: str, method) -> list[str]:
    """Prompt-learning methods (they cannot pack) put virtual tokens before a causal LM's input only."""
    if not method.packs:
        return [f"method.name: {method.name} serves causal LMs only, not objective {objective}"]
    return []


def refuse_canaries(objective: str, data) -> None:
    """Canaries are secrets a causal LM learns to write out; ``tunesmith privacy audit`` measures them
    on causal LMs only. ``data`` is the ``data:`` section."""
    if data.canaries:
        raise TunesmithError(f"data.canaries: canaries are measured on causal LMs only, not objective {objective}; "
                             "use objective.name: causal or remove data.canaries")
