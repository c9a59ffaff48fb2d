"""Typed run configuration: YAML plus ``--set a.b=value`` overrides resolve to one ``RunConfig``.

Every invalid field is reported at once, with its dotted path, as a ``TunesmithError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.errors import TunesmithError


class _Section(BaseModel):
    # A misspelt key is a silent no-op in most YAML-driven tools; here it is an error.
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    name: str = Field("smollm2-135m", description="Alias, local HF directory, GGUF file or hub id.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    task: Literal["causal", "classification", "seq2seq"] = Field(
        "causal", description="causal LM, a classification head (encoder or decoder), or T5-style seq2seq."
    )


class ColumnsConfig(_Section):
    """Which of the user's columns play which role. Unset roles are guessed from common names."""

    prompt: str | None = None
    completion: str | None = None
    messages: str | None = None
    text: str | None = None
    label: str | None = None


class SplitConfig(_Section):
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)
    stratify: bool = True

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> SplitConfig:
        if self.validation + self.test >= 1:
            raise ValueError("validation + test must be below 1, leaving rows to train on")
        return self


class DataConfig(_Section):
    path: str | None = Field(None, description="One file to split; or give train (+ validation/test).")
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    format: Literal["auto", "prompt_completion", "chat", "text", "classification"] = "auto"
    columns: ColumnsConfig = ColumnsConfig()
    label_map: dict[str, str] | None = Field(
        None, description="Rename labels; rows whose label is not a key are dropped."
    )
    instruction: str = Field(
        "{text}", description="For label data on a causal model: the prompt, with {text} filled in."
    )
    template: str = Field("chat", description="'chat' (the tokenizer's chat template) or 'plain'.")
    system_prompt: str | None = None
    max_length: int = Field(512, ge=8)
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=1)
    max_rows: int | None = Field(None, ge=1, description="Keep at most this many rows after cleaning.")
    split: SplitConfig = SplitConfig()
    seed: int = 0
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1)

    @model_validator(mode="after")
    def _has_a_source(self) -> DataConfig:
        if not self.path and not self.train:
            raise ValueError("give data.path (one file to split) or data.train")
        if self.path and self.train:
            raise ValueError("give either data.path or data.train, not both")
        if "{text}" not in self.instruction:
            raise ValueError("data.instruction must contain {text}")
        return self


class MethodConfig(_Section):
    """Options of every method; each method reads the ones that concern it."""

    name: str = "lora"
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str | None = Field(
        None, description="Module names to adapt; default per architecture, 'all-linear' for every linear."
    )
    # lora, qlora
    use_dora: bool = Field(False, description="DoRA: learn each weight's magnitude apart from its direction.")
    use_rslora: bool = Field(False, description="rsLoRA: scale updates by alpha/sqrt(r) instead of alpha/r.")
    # prefix, prompt, ptuning
    num_virtual_tokens: int = Field(20, ge=1)
    prompt_init_text: str | None = Field(
        None, min_length=1, description="prompt: start the virtual tokens from this text's embeddings."
    )
    # adapter
    adapter_size: int = Field(64, ge=1, description="Bottleneck width of each adapter.")
    adapter_position: Literal["ffn", "both"] = Field(
        "ffn", description="After the feed-forward block (Pfeiffer) or after attention too (Houlsby)."
    )
    adapter_activation: Literal["gelu", "relu"] = "gelu"


class TrainConfig(_Section):
    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    batch_tokens: int = Field(
        2048, ge=16, description="Tokens per micro-batch: examples are packed, so no compute on padding."
    )
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    dropout: float | None = Field(None, ge=0, lt=1, description="Override the model's dropout rates.")
    seed: int = 0
    eval_every: int = Field(50, ge=1, description="Validate every N optimizer steps.")
    eval_max_examples: int | None = Field(200, ge=1)
    patience: int | None = Field(None, ge=1, description="Stop after N validations without improvement.")
    save_every: int = Field(100, ge=1)
    threads: int | None = Field(None, ge=1)
    packing: bool = Field(
        True, description="Pack examples into rows of data.max_length; off: batches of similar-length "
        "examples, one per row, right-padded."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder layer in the backward pass: less memory, ~30% more compute."
    )
    compile: bool = Field(False, description="torch.compile each decoder layer.")
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="bf16 autocast of the training forward and validation; 'auto': where bf16 "
        "matmuls are native (CPUs with AVX512-BF16 or AMX, GPUs with bf16), 'no': float32 throughout."
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_booleans(cls, value):
        # YAML reads a bare no/off/false as False (and yes/on/true as True).
        return {False: "no", True: "bf16"}.get(value, value) if isinstance(value, bool) else value


class EvalConfig(_Section):
    max_examples: int | None = Field(None, ge=1, description="Cap on test examples scored.")
    samples: int = Field(3, ge=0, description="Generated samples shown in the report.")
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(16, ge=1)


class OutputConfig(_Section):
    dir: str = "runs/run"
    merge: bool = False


class RunConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()


def _parse_value(text: str) -> Any:
    # YAML scalars give the types users expect from --set: 3 -> int, 1e-4 -> float, true -> bool.
    value = yaml.safe_load(text)
    if isinstance(value, str) and _looks_like_float(value):
        return float(value)
    return value


def _looks_like_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings to a nested dict, creating sections as needed."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"--set {item!r}: expected key.sub=value")
            continue
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"--set {item!r}: {part} is not a section")
                break
            node = child
        else:
            node[leaf] = _parse_value(value)
    if problems:
        raise TunesmithError(*problems)
    return raw


def format_validation_error(err: ValidationError, source: str) -> list[str]:
    """One line per invalid field: ``config.yaml: train.lr: Input should be greater than 0``."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{source}: {path}: {msg}")
    return lines


def validate_config(raw: dict, source: str = "config") -> RunConfig:
    from tunesmith.methods import REGISTRY  # here, not at the top: methods import this module

    problems = []
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        problems += format_validation_error(err, source)
        config = None
    method = (raw.get("method") or {}).get("name", "lora") if isinstance(raw.get("method"), dict | None) else None
    if isinstance(method, str) and method not in REGISTRY:
        problems.append(f"{source}: method.name: unknown method {method!r}; known: {', '.join(REGISTRY)}")
    elif isinstance(method, str):
        section = config.method if config else _valid_method_section(raw.get("method") or {})
        if section is not None:
            problems += [f"{source}: {p}" for p in REGISTRY[method].check(section)]
    if problems:
        raise TunesmithError(*problems)
    return config


def _valid_method_section(raw: dict) -> MethodConfig | None:
    # The method's own checks run even when other sections are invalid, so all problems show at once.
    try:
        return MethodConfig.model_validate(raw)
    except ValidationError:
        return None  # its problems are already reported


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply overrides, validate, and resolve relative data paths."""
    path = Path(path)
    if not path.is_file():
        raise TunesmithError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise TunesmithError(f"{path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise TunesmithError(f"{path}: expected a mapping of sections (model, data, method, train, ...)")
    config = validate_config(apply_overrides(raw, overrides or []), str(path))
    return _resolve_paths(config, path.parent)


def _resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    # Data paths in a config are relative to the config file, like includes in most tools;
    # "builtin:" names bundled data sets and is resolved by the data layer.
    data = config.data
    for field in ("path", "train", "validation", "test"):
        value = getattr(data, field)
        if value and not value.startswith("builtin:") and not Path(value).is_absolute():
            candidate = base / value
            if candidate.exists() or not Path(value).exists():
                setattr(data, field, str(candidate))
    return config


def save_config(config: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
