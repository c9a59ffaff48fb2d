"""What every fine-tuning method provides."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config import MethodConfig


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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (adapter layers stay injected)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model
