"""The ``privacy:`` section of a run's configuration: differentially private training (DP-SGD)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunesmith.options import Section


class PrivacyConfig(Section):
    """DP-SGD: each example's gradient clipped, Gaussian noise added once per logical batch.

    The privacy unit is one training example (one row of the data after cleaning and splitting).
    """

    target_epsilon: float | None = Field(
        None, gt=0, description="The epsilon to spend over the planned steps; the noise is chosen to meet it."
    )
    noise_multiplier: float | None = Field(
        None, ge=0, description="The noise std as a multiple of max_grad_norm; epsilon is then reported."
    )
    delta: float | None = Field(
        None, gt=0, lt=1, description="Default: 1/N rounded down to a power of ten, at most 1e-5 "
        "(N: training examples)."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Each example's gradient is clipped to this L2 norm.")
    accountant: Literal["prv", "rdp"] = Field(
        "prv", description="Opacus's accountant: PRV (tight), or RDP (the classic, looser)."
    )
    expected_batch_size: int = Field(
        ..., ge=1, description="Examples per logical batch on average: each example joins a batch with "
        "probability expected_batch_size / N (Poisson sampling)."
    )

    @model_validator(mode="after")
    def _one_noise_setting(self):
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of target_epsilon and noise_multiplier")
        return self


def check(privacy: PrivacyConfig, train, method) -> list[str]:
    """Problems with training privately with ``train`` (a ``TrainConfig``) and ``method`` (a ``Method``)."""
    problems = []
    if train.packing:
        problems.append("train.packing: false is required with privacy: the privacy unit is one example, "
                        "so each row must hold one")
    if train.grad_accum != 1:
        problems.append("train.grad_accum: must be 1 with privacy: privacy.expected_batch_size sets the "
                        "logical batch, and train.batch_tokens how it is split into micro-batches")
    if train.activation_checkpointing:
        problems.append("train.activation_checkpointing: not with privacy: torch.func's per-example gradients "
                        "cannot run through checkpointed layers")
    if train.curriculum is not None:
        problems.append("train.curriculum: not with privacy: Poisson sampling, which the accounting assumes, "
                        "decides each batch")
    if not method.per_example_grads:
        problems.append(f"method.name: {method.name} has no per-example gradients for private training; "
                        "use lora (the same adapters on a full-precision base)")
    return problems
