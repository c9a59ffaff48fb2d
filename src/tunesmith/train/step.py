"""One optimizer step, as an object the loop calls: the seam where differentially private training
(per-example clipping and noise) or PPO put their own step, without forking the loop.

The default step is forward and backward over the step's micro-batches, gradient clipping, the
optimizer and the scheduler. The forward runs through ``LossForward``, the module accelerate
prepares (wraps in DDP, FSDP or DeepSpeed), so that gradients are synchronised across processes
even though an objective's loss may run the decoder and the output head separately.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch

from tunesmith.objectives.base import Batches
from tunesmith.train import distributed
from tunesmith.train.options import TrainConfig
from tunesmith.train.precision import autocast


class LossForward(torch.nn.Module):
    """The model with its objective's loss as ``forward``: what accelerate wraps for several processes."""

    def __init__(self, model: torch.nn.Module, batches: Batches):
        super().__init__()
        self.model = model
        self.batches = batches

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.batches.loss(self.model, batch)


@dataclass
class StepResult:
    loss_sum: float  # summed loss over the step's micro-batches, on every process
    trained_tokens: int  # what the loss is averaged over, on every process
    grad_norm: float | None = None


class Step(Protocol):
    """Takes this process's share of a step's micro-batches (tensors on the CPU); updates the model."""

    def __call__(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult: ...


class DefaultStep:
    """Backward through the micro-batches, clip, step the optimizer and the scheduler.

    Each micro-batch's loss sum is divided by the trained tokens of the whole step, summed over every
    process, so accumulating k micro-batches on N processes gives the same gradient as one batch
    k x N times as large. DDP averages gradients over processes; the loss is multiplied by N to
    turn that average back into the sum.
    """

    def __init__(self, forward, optimizer, scheduler, accelerator, batches: Batches, cfg: TrainConfig):
        self.forward = forward
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.accelerator = accelerator
        self.batches = batches
        self.cfg = cfg
        self.params = [p for p in forward.parameters() if p.requires_grad]

    def __call__(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        acc = self.accelerator
        n_tokens = distributed.total(sum(self.batches.trained_tokens(t) for t in micro_batches), acc)
        step_loss = 0.0
        for i, t in enumerate(micro_batches):
            t = {k: v.to(acc.device) for k, v in t.items()}
            sync = acc.no_sync(self.forward) if i < len(micro_batches) - 1 else nullcontext()
            with sync:
                with autocast(self.cfg.mixed_precision, acc.device):
                    s = self.forward(t)
                acc.backward(s * acc.num_processes / max(n_tokens, 1))
            step_loss += s.item()
        grad_norm = None
        if self.cfg.max_grad_norm:
            grad_norm = float(acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(distributed.total(step_loss, acc), n_tokens, grad_norm)
