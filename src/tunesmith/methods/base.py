"""What every fine-tuning method provides."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.options import Section


def no_problems(options: Section) -> list[str]:
    return []


def no_load_kwargs(options: Section) -> dict:
    return {}


def not_served(options: Section) -> str | None:
    return None


def not_merged(options: Section) -> Merging | None:
    return None


def no_merge_problem(options: dict[str, Section], how: str) -> str | None:
    return None


# How a run's saved weights are served on a shared base model (``Method.serves``).
MIXED = "mixed"  # a named adapter that shares batches with other such adapters and the base
ALONE = "alone"  # a named adapter of the shared base, decoded in batches of its own
APART = "apart"  # an adapter on a copy of the base of its own (PEFT holds one adapter type per model)


@dataclass(frozen=True)
class Merging:
    """How ``tunesmith merge`` combines several runs' adapters of one method into one adapter (PEFT's
    ``add_weighted_adapter``): a method's ability ``Method.merges``."""

    hows: tuple[str, ...]  # the ways it combines them (``merge --how``)
    # ``combine(model, names, weights, how, density)``: add to the PEFT ``model``, which holds the
    # runs' adapters as ``names``, their combination as adapter ``default``; returns the changes to
    # the method's options that describe it (LoRA's rank after ``svd``).
    combine: Callable[[torch.nn.Module, list[str], list[float], str, float], dict]
    # A problem with combining runs of these options (by run name) this way, in one line; None if none.
    check: Callable[[dict[str, Section], str], str | None] = no_merge_problem


@dataclass(frozen=True)
class Method:
    name: str
    # The method's typed options (a Section with ``name: Literal[<name>]``); config.py puts them
    # in the union of ``method:`` sections, so an option the method does not take is an error.
    options: type[Section]
    # Wrap or modify a freshly loaded base model so that only the method's parameters train.
    apply: Callable[[torch.nn.Module, Section], torch.nn.Module]
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
    # Problems with running this method here (a GPU it needs, say), found at config load time.
    check: Callable[[Section], list[str]] = no_problems
    # Extra keyword arguments for the base model's ``from_pretrained`` (QLoRA loads it quantised).
    load_kwargs: Callable[[Section], dict] = no_load_kwargs
    # The run directory's folder for what ``save`` writes: the whole model, or the method's weights.
    saved_as: str = "adapter"
    # How ``tunesmith serve`` serves a run of these options beside others on one base: MIXED, ALONE,
    # APART, or None (not at all: merge and export it, and serve that on its own).
    serves: Callable[[Section], str | None] = not_served
    # How ``tunesmith merge`` combines several runs of these options into one adapter; None: it cannot.
    merges: Callable[[Section], Merging | None] = not_merged
    # Whether the tuned model holds its base whole beside the method's weights, so that
    # ``model.disable_adapter()`` gives the base back (PEFT's methods) without loading it again.
    disables: bool = False
    # Whether torch.func can take per-example gradients through the method's layers (private
    # training, ``privacy.dp``): not through an autograd.Function written without ``setup_context``.
    per_example_grads: bool = True
