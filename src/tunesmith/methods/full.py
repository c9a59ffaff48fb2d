"""Full fine-tuning: every weight trains; the run stores the whole model as safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from tunesmith.methods.base import Method
from tunesmith.options import Section


class Options(Section):
    name: Literal["full"] = "full"


def apply(model, cfg):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save(model, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)


def load(base, path: Path):
    # The base's own class: a causal LM, a classifier or a seq2seq model.
    return type(base).from_pretrained(path, dtype=base.dtype)


METHOD = Method(name="full", options=Options, apply=apply, save=save, load=load, merge=lambda m: m,
                saved_as="model")
