"""DP-SGD's optimizer step: per-example gradients, each clipped to ``max_grad_norm``, summed, and
Gaussian noise added once per logical batch; then the optimizer and the scheduler step.

Per-example gradients come from ``torch.func``: ``vmap`` over the rows of a micro-batch of ``grad``
of one row's loss, through ``functional_call`` with the trainable parameters only. We chose it over
Opacus's GradSampleModule hooks because the hooks are right only where they know the layer and
see every use of a parameter. On the tiny test Llama both matched per-example autograd for LoRA
and bottleneck adapters; the hooks gave (IA)³ no per-example gradients (its vectors live in a
ParameterDict that never runs a forward), silently wrong ones for full fine-tuning (the tied output
head is applied with ``F.linear`` on the embedding weight, outside any hooked module) and crashed
on prompt tuning, while ``torch.func`` matched autograd for all of them. It also needs no state
on the parameters (Opacus #820: hook registration with PEFT silently corrupted LoRA updates), and
handles tied weights by construction: the shared tensor is substituted at every use and its
gradient sums them. Frozen parameters stay constants, so only trainable ones get per-example
copies. Both compute a micro-batch in one batched forward and backward (on the CPU, attention
through the math kernel: see ``batched_attention``); what ``torch.func`` costs more here is logits
at every position (``row_loss``) instead of only at labelled tokens. Speed was not measured when
choosing: correctness decided, and ``benchmarks/dp_overhead.py`` (issue 10) is to measure it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Protocol, runtime_checkable

import torch
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from tunesmith.errors import TunesmithError
from tunesmith.privacy.accounting import Budget
from tunesmith.train.options import TrainConfig
from tunesmith.train.precision import autocast
from tunesmith.train.step import StepResult


@runtime_checkable
class RowLossBatches(Protocol):
    """Batches whose examples private training can take gradients of, one by one under ``vmap``."""

    def row_loss(self, model: torch.nn.Module, row: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, count) of a batch of one row, with no data-dependent shapes (vmap-safe)."""


@runtime_checkable
class PrivateBatches(RowLossBatches, Protocol):
    """What ``DPStep`` needs of its batches, beyond ``Batches`` (``privacy.PoissonBatches``)."""

    def micro_batches(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of a logical batch's tensors, one example per row."""


class RowLoss(torch.nn.Module):
    """The model with one row's loss as ``forward``: what ``functional_call`` re-parametrises."""

    def __init__(self, model: torch.nn.Module, batches: PrivateBatches):
        super().__init__()
        self.model = model
        self.batches = batches

    def forward(self, row: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches.row_loss(self.model, row)


def clip_and_sum(grads: list[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-example gradients (each ``[B, *shape]``) scaled so that each example's norm over all
    parameters is at most ``max_norm``, then summed over examples; and the norms before clipping."""
    norms = torch.stack([g.flatten(1).float().pow(2).sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("b,b...->...", scale.to(g.dtype), g) for g in grads], norms


def batched_attention(device: torch.device):
    """vmap has batching rules for the CUDA attention kernels but not for the CPU one, which it would
    run one example at a time (PyTorch warns of a performance drop); on the CPU, the math kernel
    (batched matmuls and a softmax) instead."""
    return sdpa_kernel([SDPBackend.MATH]) if device.type == "cpu" else nullcontext()


def refuse_processes(processes: int) -> None:
    # Several processes would each clip and noise their own share: noise N times over, and an
    # accounting this module does not do.
    if processes > 1:
        raise TunesmithError(f"privacy: private training runs on one process, not {processes}; start it "
                             "without accelerate launch or torchrun")


class DPStep:
    """A ``Step`` for DP-SGD; build it with ``functools.partial(DPStep, budget=...)`` for ``fit``.

    Each example's loss is its mean over its trained tokens, so that the clipping norm means the same
    for short and long examples. The noised sum is divided by the expected batch size, not by the
    batch drawn: the drawn size would itself reveal who is in the batch.
    """

    def __init__(self, forward, optimizer, scheduler, accelerator, batches: PrivateBatches, cfg: TrainConfig,
                 *, budget: Budget):
        refuse_processes(accelerator.num_processes)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.accelerator = accelerator
        self.batches = batches
        self.cfg = cfg
        self.budget = budget
        self.loss = RowLoss(accelerator.unwrap_model(forward).model, batches)
        # named_parameters lists a tied weight once: it gets one per-example gradient for all its uses.
        trainable = [(n, p) for n, p in self.loss.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in trainable]
        self.params = [p for _, p in trainable]
        # Dropout differs per example, as in an ordinary batch.
        self.example_grads = vmap(grad(self._example_loss, has_aux=True), in_dims=(None, 0),
                                  randomness="different")

    def _example_loss(self, params: dict[str, torch.Tensor], row: dict[str, torch.Tensor]):
        loss, count = functional_call(self.loss, params, ({k: v.unsqueeze(0) for k, v in row.items()},))
        return loss / count.clamp(min=1), (loss.detach(), count)

    def clipped_sum(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[list[torch.Tensor], float, int]:
        """The sum of the clipped per-example gradients of the logical batch in ``micro_batches``
        (float32, one per trainable parameter), its summed loss and its trained tokens."""
        device = self.accelerator.device
        params = {n: p.detach() for n, p in zip(self.names, self.params)}
        summed = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        loss_sum, tokens = 0.0, 0
        for batch in micro_batches:
            for micro in self.batches.micro_batches(batch):
                micro = {k: v.to(device) for k, v in micro.items()}
                with autocast(self.cfg.mixed_precision, device), batched_attention(device):
                    grads, (losses, counts) = self.example_grads(params, micro)
                clipped, _ = clip_and_sum([grads[n] for n in self.names], self.budget.max_grad_norm)
                for s, c in zip(summed, clipped):
                    s += c.float()
                loss_sum += float(losses.sum())
                tokens += int(counts.sum())
        return summed, loss_sum, tokens

    def __call__(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        summed, loss_sum, tokens = self.clipped_sum(micro_batches)
        std = self.budget.noise_multiplier * self.budget.max_grad_norm
        for p, s in zip(self.params, summed):
            noise = torch.normal(0.0, std, s.shape, device=s.device) if std else 0.0
            p.grad = ((s + noise) / self.budget.expected_batch_size).to(p.dtype)
        grad_norm = float(torch.stack([p.grad.float().norm() for p in self.params]).norm())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_sum, tokens, grad_norm)
