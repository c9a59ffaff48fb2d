"""The ``train:`` section of a run's configuration."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from tunesmith.options import Section


class CurriculumConfig(Section):
    """Easy examples first (``train.curriculum``): the training data ordered by a difficulty score,
    and a pacing schedule that widens the pool drawn from, from the easiest ``start`` fraction to all
    of it once ``until`` of the planned training is done."""

    by: Literal["length", "base_loss"] = Field(
        description="length: tokens per example; base_loss: the base model's loss per trained token on the "
        "example (computed once, before training, and cached in the run directory)."
    )
    pacing: Literal["linear", "root"] = Field(
        "linear", description="How the pool grows: linearly, or as the square root (fast at first)."
    )
    start: float = Field(0.2, gt=0, le=1, description="The easiest fraction of the data drawn from at first.")
    until: float = Field(0.5, gt=0, le=1, description="The fraction of the planned training after which "
                         "every example is drawn from.")
    stages: int = Field(10, ge=1, description="Pool sizes per epoch: each stage draws from a wider pool.")


VALIDATIONS = 10  # validations per run when train.eval_every is unset


class TrainConfig(Section):
    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    batch_tokens: int = Field(
        2048, ge=16, description="Tokens per micro-batch (per process): examples are packed, so no compute "
        "on padding."
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (per process).")
    lr: float = Field(2e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    dropout: float | None = Field(None, ge=0, lt=1, description="Override the model's dropout rates.")
    seed: int = 0
    eval_every: int | None = Field(
        None, ge=1, description="Validate every N optimizer steps; unset: about ten times a run "
        f"(every planned steps / {VALIDATIONS}), so the report can tell an under-trained run from an over-fitted one."
    )
    eval_max_examples: int | None = Field(200, ge=1)
    patience: int | None = Field(None, ge=1, description="Stop after N validations without improvement.")
    keep_best: bool = Field(
        True, description="End with the weights of the step that validated best (an over-fitted run's "
        "lowest validation loss); false: the last step's."
    )
    save_every: int = Field(100, ge=1)
    threads: int | None = Field(None, ge=1)
    packing: bool = Field(
        True, description="Pack examples into rows of data.max_length; off: batches of similar-length "
        "examples, one per row, right-padded."
    )
    shared_prefix: bool = Field(
        True, description="With packing: when every example starts with the same tokens (system prompt, "
        "template, instruction), a row holds them once and each example's remainder attends to them."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder layer in the backward pass: less memory, ~30% more compute."
    )
    compile: bool = Field(False, description="torch.compile each decoder layer.")
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="bf16 autocast of the training forward and validation; 'auto': where bf16 "
        "matmuls are native (CPUs with AVX512-BF16 or AMX, GPUs with bf16), 'no': float32 throughout."
    )
    curriculum: CurriculumConfig | None = Field(None, description="Order the training data easy first; off by default.")

    replay: float = Field(
        0.0, ge=0, lt=1, description="With --from: this share of the training examples is drawn from the parent "
        "run's training data, so that an update does not erase what came before."
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_booleans(cls, value):
        # YAML reads a bare no/off/false as False (and yes/on/true as True).
        return {False: "no", True: "bf16"}.get(value, value) if isinstance(value, bool) else value
