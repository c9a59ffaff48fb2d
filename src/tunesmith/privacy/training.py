"""What the recipe needs for a private run: the sampler, the step and the budget, checked together."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from tunesmith.errors import TunesmithError
from tunesmith.objectives.base import Objective
from tunesmith.privacy.accounting import Budget, plan_budget
from tunesmith.privacy.dp import DPStep, RowLossBatches, refuse_processes
from tunesmith.privacy.options import PrivacyConfig
from tunesmith.privacy.sampler import PoissonBatches
from tunesmith.train.loop import MakeStep, planned_steps
from tunesmith.train.options import TrainConfig


@dataclass(frozen=True)
class PrivateTraining:
    """What ``fit`` takes for a private run: its batches, its step, and the epsilon to log."""

    budget: Budget
    batches: PoissonBatches

    @property
    def make_step(self) -> MakeStep:
        return partial(DPStep, budget=self.budget)

    def validation_figures(self, step: int) -> dict:
        return {"epsilon": self.budget.summary(step)["epsilon"]}

    def describe(self) -> str:
        """The plan, in one line, before training starts."""
        b = self.budget
        spends = b.summary(b.planned_steps)["epsilon"]
        goal = "no privacy (no noise)" if spends is None else f"epsilon {spends:.3g}"
        return (f"privacy: noise multiplier {b.noise_multiplier:.4g}, clipping norm {b.max_grad_norm:g}, sample "
                f"rate {b.sample_rate:.4g}: {goal} at delta {b.delta:g} over {b.planned_steps} steps")


def prepare_private(privacy: PrivacyConfig, train: TrainConfig, objective: Objective, items: list[dict],
                    processes: int) -> PrivateTraining:
    """The sampler and the budget of a private run on ``items`` (the objective's encoded training
    examples). Every problem surfaces here, before training."""
    refuse_processes(processes)
    batches = PoissonBatches(items, objective.batches, privacy.expected_batch_size, train.seed)
    if not isinstance(batches.full, RowLossBatches):
        # Padded batches need their attention mask, and transformers looks inside it (to skip it when
        # nothing is padded): data-dependent control flow, which vmap refuses.
        raise TunesmithError(f"objective.name: private training needs a per-example loss that torch.func can "
                             f"batch, which objective {objective.name} does not have yet; use objective causal")
    return PrivateTraining(plan_budget(privacy, len(items), planned_steps(batches, train, processes)), batches)
