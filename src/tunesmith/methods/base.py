"""What every fine-tuning method provides."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config import MethodConfig


def no_problems(cfg: MethodConfig) -> list[str]:
    return []


def no_load_kwargs(cfg: MethodConfig) -> dict:
    return {}


@dataclass(frozen=True)
class Method:
    name: str
    # Wrap or modify a freshly loaded base model so that only the method's parameters train.
    apply: Callable[[torch.nn.Module, MethodConfig], torch.nn.Module]
    # Save only what the method trained, in the format its users expect (PEFT, safetensors).
    save: Callable[[torch.nn.Module, Path], None]
    # Rebuild the tuned model from a base model and a saved directory.
    load: Callable[[torch.nn.Module, Path], torch.nn.Module]
    # Fold the method into the base weights, returning a plain transformers model; None if impossible.
    merge: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    # Whether the tuned model can run the base model's decoder directly (needed by the label-only
    # output projection); methods that inject virtual tokens through the forward call cannot.
    direct_decoder: bool = True
    # Whether several examples may share a row. Methods that prepend virtual tokens once per row
    # (prefix, prompt, p-tuning) need one example per row.
    packs: bool = True
    # Problems with a config that this method cannot run, found at config load time ("method.x: why").
    check: Callable[[MethodConfig], list[str]] = no_problems
    # Extra keyword arguments for the base model's ``from_pretrained`` (QLoRA loads it quantised).
    load_kwargs: Callable[[MethodConfig], dict] = no_load_kwargs


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (adapter layers stay injected)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model
