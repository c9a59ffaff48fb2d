"""The configurations of the alignment commands: the shared ``model:``, ``method:``, ``train:`` and
``output:`` sections, and each command's own section, ``ppo:`` or ``grpo:``.

An alignment run has no ``data:`` section: it trains on its own answers to prompts, scored by a
reward. The prompt and sampling options that PPO and GRPO share are ``RolloutOptions``; each
command's section adds its own. ``train:`` gives the optimiser (lr, warm-up, schedule, clipping),
the number of steps (``train.max_steps``), the seed and ``save_every``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from tunesmith.align.grpo_rewards import REWARDS, RewardOptions, check_rewards

from tunesmith.config import (
    DEFAULT_METHOD,
    MethodOptions,
    ModelConfig,
    OutputConfig,
    apply_overrides,
    format_validation_error,
    read_config_file,
    relative_to,
)
from tunesmith.errors import TunesmithError
from tunesmith.methods import REGISTRY as METHODS
from tunesmith.options import Section
from tunesmith.train.options import TrainConfig


class RolloutOptions(Section):
    """Where the prompts come from, how they are framed, and how answers are sampled: what PPO and
    GRPO share. ``section`` names the config section that holds them, for messages."""

    section: ClassVar[str]

    prompts: str = Field(..., description="File of prompts (CSV, JSONL, ...), or builtin:NAME.")
    prompt_column: str = "text"
    prompt_filter: dict[str, str | list[str]] = Field(
        default_factory=dict, description="Keep only rows whose column equals the value (or one of the values), "
        "e.g. {category: plot}."
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

    @field_validator("instruction")
    @classmethod
    def _has_text(cls, value: str) -> str:
        if "{text}" not in value:
            raise ValueError("must contain {text}")
        try:
            value.format(text="")
        except (KeyError, IndexError, ValueError):
            raise ValueError("{text} is its only field; write a literal brace as {{ or }}") from None
        return value


class PPOOptions(RolloutOptions):
    section: ClassVar[str] = "ppo"

    reward: str | None = Field(
        None, description="Run directory of the reward: a classification run, a causal run on label data, or a "
        "reward-model run. Relative to the config file."
    )
    reward_label: str = Field("positive", description="With a classifier: the label whose log-odds is the reward.")
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


class _AlignConfig(Section):
    """The sections every alignment config has; each command's config adds its own section."""

    model: ModelConfig = ModelConfig()
    method: MethodOptions = Field(default_factory=lambda: METHODS[DEFAULT_METHOD].options())
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_method(cls, raw):
        if isinstance(raw, dict) and isinstance(raw.get("method"), dict) and "name" not in raw["method"]:
            raw = {**raw, "method": {"name": DEFAULT_METHOD, **raw["method"]}}
        return raw


class PPOConfig(_AlignConfig):
    ppo: PPOOptions

    @property
    def rollout(self) -> PPOOptions:
        return self.ppo


class GRPOOptions(RolloutOptions):
    section: ClassVar[str] = "grpo"

    rewards: list[RewardOptions] = Field(
        ..., min_length=1, description="Rewards summed with their weights: function, exact, regex, json_schema, run."
    )
    samples_per_prompt: int = Field(4, ge=2, description="G: answers sampled per prompt, the group.")
    num_iterations: int = Field(1, ge=1, description="Passes over each step's answers (mu in the GRPO paper).")
    minibatch_size: int | None = Field(
        None, ge=1, description="Answers per optimizer update; default: all the answers of a step."
    )
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = Field(
        "dapo", description="dapo: mean over the tokens of an update; grpo: mean over answers of each answer's "
        "token mean; dr_grpo: sum over tokens / (answers x max_new_tokens)."
    )
    importance: Literal["token", "sequence"] = Field(
        "token", description="token: one ratio per token; sequence: the answer's mean log-ratio (GSPO)."
    )
    scale_rewards: bool = Field(True, description="Divide advantages by the group's reward std (Dr. GRPO: false).")
    clip: float = Field(0.2, gt=0, description="Ratio clip range, below 1 (and above, without clip_high).")
    clip_high: float | None = Field(None, gt=0, description="Ratio clip range above 1 (DAPO's clip-higher: 0.28).")
    beta: float = Field(0.0, ge=0, description="KL penalty to the reference (the adapter disabled); 0: none.")
    mask_truncated: bool = Field(False, description="Leave answers with no end-of-turn token out of the loss.")


class GRPOConfig(_AlignConfig):
    grpo: GRPOOptions

    @property
    def rollout(self) -> GRPOOptions:
        return self.grpo


def load_ppo_config(path: str | Path, overrides: list[str] | None = None, raw: dict | None = None) -> PPOConfig:
    """Read and validate a PPO config (every problem at once, with its path); paths in ``ppo:`` are
    relative to the config file."""
    config = _validated(PPOConfig, path, overrides, raw)
    cfg, problems = config.ppo, _common_problems(config)
    if cfg.minibatch_size > cfg.prompts_per_step * cfg.samples_per_prompt:
        problems.append("ppo.minibatch_size: larger than the answers of a step (prompts_per_step x samples_per_prompt)")
    _raise(path, problems)
    base = Path(path).parent
    cfg.prompts = relative_to(base, cfg.prompts)
    if cfg.reward:
        cfg.reward = relative_to(base, cfg.reward)
    return config


def load_grpo_config(path: str | Path, overrides: list[str] | None = None, raw: dict | None = None) -> GRPOConfig:
    """Read and validate a GRPO config (every problem at once, with its path), its reward functions
    imported; paths in ``grpo:`` are relative to the config file."""
    config = _validated(GRPOConfig, path, overrides, raw)
    cfg, problems = config.grpo, _common_problems(config)
    if cfg.minibatch_size and cfg.minibatch_size > cfg.prompts_per_step * cfg.samples_per_prompt:
        problems.append("grpo.minibatch_size: larger than the answers of a step (prompts_per_step x "
                        "samples_per_prompt)")
    cfg.prompts = relative_to(Path(path).parent, cfg.prompts)
    problems += check_rewards(cfg.rewards, Path(path).parent, "grpo.rewards")
    _raise(path, problems)
    return config


# The alignment commands, by the section that marks their configs (and runs).
LOADERS = {"ppo": load_ppo_config, "grpo": load_grpo_config}


def load_align_config(path: str | Path) -> PPOConfig | GRPOConfig:
    """A saved alignment run's config, read by the loader of the section it has."""
    raw = read_config_file(path)
    return LOADERS[next(s for s in LOADERS if s in raw)](path, raw=raw)


def _validated(cls, path, overrides, raw):
    raw = read_config_file(path) if raw is None else raw
    raw = apply_overrides(raw, overrides or [])
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise TunesmithError(*format_validation_error(err, str(path), REWARD_TAGS)) from None


# Rewards are a list of options tagged by ``name`` (config.format_validation_error).
REWARD_TAGS = {("grpo", "rewards", "*"): (REWARDS, "reward")}


def _common_problems(config: _AlignConfig) -> list[str]:
    method = METHODS[config.method.name]
    problems = list(method.check(config.method))
    if not method.disables:  # the reference model is the policy with its adapter disabled
        problems.append(f"method.name: {config.rollout.section.upper()} needs a method whose adapter can be disabled "
                        f"(the reference model; Method.disables), such as lora; {method.name} has none")
    if config.train.max_steps is None:
        problems.append("train.max_steps: give the number of steps")
    if config.train.mixed_precision == "bf16":  # refused, not ignored: "auto" is float32 here too
        problems.append(f"train.mixed_precision: bf16 autocast is not implemented for {config.rollout.section.upper()}, "
                        "which trains in float32; use auto or no")
    return problems


def _raise(path, problems: list[str]) -> None:
    if problems:
        raise TunesmithError(*(f"{path}: {p}" for p in problems))
