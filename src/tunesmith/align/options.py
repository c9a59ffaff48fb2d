"""The configuration of a PPO run: the shared ``model:``, ``method:``, ``train:`` and ``output:``
sections, and its own ``ppo:`` section.

A PPO run has no ``data:`` section: it trains on its own answers to prompts (``ppo.prompts``), judged
by a reward run (``ppo.reward``). ``train:`` gives the optimiser (lr, warm-up, schedule, clipping),
the number of PPO steps (``train.max_steps``), the seed and ``save_every``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator

from tunesmith.config import (
    DEFAULT_METHOD,
    MethodOptions,
    ModelConfig,
    OutputConfig,
    apply_overrides,
    format_validation_error,
    read_config_file,
)
from tunesmith.errors import TunesmithError
from tunesmith.methods import REGISTRY as METHODS
from tunesmith.options import Section
from tunesmith.train.options import TrainConfig


class PPOOptions(Section):
    reward: str | None = Field(
        None, description="Run directory of the reward: a classification run, a causal run on label data, or a "
        "reward-model run. Relative to the config file."
    )
    reward_label: str = Field("positive", description="With a classifier: the label whose log-odds is the reward.")
    prompts: str = Field(..., description="File of prompts (CSV, JSONL, ...), or builtin:NAME.")
    prompt_column: str = "text"
    prompt_filter: dict[str, str] = Field(
        default_factory=dict, description="Keep only rows whose column equals the value, e.g. {category: plot}."
    )
    instruction: str = Field("{text}", description="The user turn, with {text} the prompt column's value.")
    system_prompt: str | None = None
    max_prompt_chars: int = Field(600, ge=1, description="A prompt's text is cut at the word before this.")
    max_prompts: int | None = Field(None, ge=2, description="Keep at most this many prompts (a seeded sample).")
    eval_prompts: int = Field(16, ge=1, description="Held-out prompts for base vs tuned in the report.")
    prompts_per_step: int = Field(8, ge=1)
    samples_per_prompt: int = Field(2, ge=1, description="Answers sampled per prompt in a step.")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0: sample from the whole distribution (what the KL assumes).")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each step's answers.")
    minibatch_size: int = Field(8, ge=1, description="Answers per optimizer step within a PPO epoch.")
    kl_coef: float = Field(0.05, ge=0, description="KL penalty coefficient (the start value when adaptive).")
    kl_target: float | None = Field(
        None, gt=0, description="Adaptive KL (Ziegler et al.): steer the mean KL per answer to this value."
    )
    kl_horizon: float = Field(
        10000,
        gt=0,
        description="Adaptive KL: answers over which the coefficient adapts (a step moves it by at most "
        "20% x answers/horizon; short runs need a short horizon).",
    )
    clip: float = Field(0.2, gt=0, description="Policy ratio clip range.")
    value_clip: float = Field(0.2, gt=0)
    value_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    missing_eos_penalty: float | None = Field(
        1.0, ge=0, description="Subtracted from the score of an answer cut off before its end-of-turn token."
    )

    @field_validator("instruction")
    @classmethod
    def _has_text(cls, value: str) -> str:
        if "{text}" not in value:
            raise ValueError("must contain {text}")
        return value


class PPOConfig(Section):
    model: ModelConfig = ModelConfig()
    method: MethodOptions = Field(default_factory=lambda: METHODS[DEFAULT_METHOD].options())
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()
    ppo: PPOOptions

    @model_validator(mode="before")
    @classmethod
    def _default_method(cls, raw):
        if isinstance(raw, dict) and isinstance(raw.get("method"), dict) and "name" not in raw["method"]:
            raw = {**raw, "method": {"name": DEFAULT_METHOD, **raw["method"]}}
        return raw


def load_ppo_config(path: str | Path, overrides: list[str] | None = None, raw: dict | None = None) -> PPOConfig:
    """Read and validate a PPO config (every problem at once, with its path); paths in ``ppo:`` are
    relative to the config file."""
    raw = read_config_file(path) if raw is None else raw
    raw = apply_overrides(raw, overrides or [])
    try:
        config = PPOConfig.model_validate(raw)
    except ValidationError as err:
        raise TunesmithError(*format_validation_error(err, str(path))) from None
    problems = [f"{path}: {p}" for p in METHODS[config.method.name].check(config.method)]
    if config.train.max_steps is None:
        problems.append(f"{path}: train.max_steps: give the number of PPO steps")
    if config.ppo.minibatch_size > config.ppo.prompts_per_step * config.ppo.samples_per_prompt:
        problems.append(f"{path}: ppo.minibatch_size: larger than the answers of a step "
                        "(prompts_per_step x samples_per_prompt)")
    if problems:
        raise TunesmithError(*problems)
    base = Path(path).parent
    for field in ("reward", "prompts"):
        value = getattr(config.ppo, field)
        if value and not value.startswith("builtin:") and not Path(value).is_absolute():
            candidate = base / value
            if candidate.exists() or not Path(value).exists():
                setattr(config.ppo, field, str(candidate))
    return config
