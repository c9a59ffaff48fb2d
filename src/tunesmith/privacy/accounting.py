"""Privacy accounting with Opacus's accountants: the epsilon a run spends, and the noise that
meets a target epsilon over the planned steps.

The mechanism is the Poisson-subsampled Gaussian: every step adds noise of standard deviation
noise_multiplier x max_grad_norm to the sum of clipped per-example gradients of a batch drawn with
sample rate q. The noise multiplier and q stay fixed through a run, so the epsilon after any
number of steps follows from those two alone (a resumed run needs no saved accountant).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tunesmith.errors import TunesmithError
from tunesmith.privacy.options import PrivacyConfig


def default_delta(examples: int) -> float:
    """1/N rounded down to a power of ten, at most 1e-5: well below the chance of any one example."""
    return min(1e-5, 10.0 ** -math.ceil(math.log10(examples)))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """The epsilon spent after ``steps`` steps (``inf`` with no noise)."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class Budget:
    """A run's privacy settings, resolved: the noise, the sampling and what they add up to."""

    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: int
    sample_rate: float
    delta: float
    accountant: str
    planned_steps: int
    target_epsilon: float | None = None

    def epsilon(self, steps: int) -> float:
        return epsilon(self.noise_multiplier, self.sample_rate, steps, self.delta, self.accountant)

    def summary(self, steps: int) -> dict:
        """What metrics.json records: the epsilon spent in ``steps`` steps (None: unbounded, no noise)."""
        spent = self.epsilon(steps)
        keep = ("delta", "noise_multiplier", "max_grad_norm", "sample_rate", "expected_batch_size",
                "accountant", "target_epsilon")
        return {"epsilon": spent if math.isfinite(spent) else None, "steps": steps,
                **{k: v for k, v in asdict(self).items() if k in keep}}


def plan_budget(privacy: PrivacyConfig, examples: int, steps: int) -> Budget:
    """Resolve ``privacy`` for ``examples`` training examples and ``steps`` planned optimizer steps.

    A target epsilon that cannot be met stops the run here, before anything is trained.
    """
    batch = privacy.expected_batch_size
    q = batch / examples
    delta = privacy.delta if privacy.delta is not None else default_delta(examples)
    sigma = privacy.noise_multiplier
    if sigma is None:
        sigma = noise_for(privacy.target_epsilon, delta, q, steps, privacy.accountant, batch, examples)
    return Budget(sigma, privacy.max_grad_norm, batch, q, delta, privacy.accountant, steps, privacy.target_epsilon)


def noise_for(target: float, delta: float, sample_rate: float, steps: int, accountant: str, batch: int,
              examples: int) -> float:
    """The smallest noise multiplier (within 0.01 of ``target`` in epsilon) that spends at most
    ``target`` in ``steps`` steps."""
    from opacus.accountants.utils import get_noise_multiplier

    # Noise of std batch x max_grad_norm on every coordinate outweighs the largest summed gradient
    # a batch can have (batch x max_grad_norm, in norm): past it nothing can be learned.
    if epsilon(batch, sample_rate, steps, delta, accountant) > target:
        raise TunesmithError(
            f"privacy.target_epsilon: {target:g} (delta {delta:g}) cannot be met in {steps} steps with "
            f"{examples} training examples (sample rate {sample_rate:.3g}): it would take a noise multiplier "
            f"above {batch}, more noise on every coordinate than a whole batch's gradient; raise "
            "privacy.target_epsilon or privacy.expected_batch_size, plan fewer steps (train.epochs, "
            "train.max_steps), or add training data")
    return float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant))
