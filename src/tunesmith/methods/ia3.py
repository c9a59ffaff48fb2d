"""(IA)³ through PEFT: learned vectors rescale chosen activations; the base stays frozen.

Keys and values are rescaled at their output, feed-forward projections at their input, as in the
paper. The vectors start at 1 (the base model) and merge into the weights exactly; ``tunesmith merge``
combines several runs' vectors by their weighted sum (``merges``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunesmith.errors import TunesmithError
from tunesmith.methods import _peft
from tunesmith.methods.base import APART, Merging, Method
from tunesmith.options import Section

# Output projections of feed-forward blocks across architectures: (IA)³ scales their input.
FEEDFORWARD = r".*\.(down_proj|fc2|w2|dense_4h_to_h|mlp\.c_proj)"


class Options(Section):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | str | None = Field(
        None, description="Module names to rescale; default: PEFT's per-architecture keys, values and feed-forward."
    )


def apply(model, cfg):
    from peft import IA3Config
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING

    model_type = model.config.model_type
    if cfg.target_modules is None and model_type not in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING:
        raise TunesmithError(
            f"method.target_modules: no default (IA)³ targets for model type {model_type!r}; name them "
            f"(module names found: {_peft.module_names(model)})"
        )
    # With targets named by the user, PEFT's per-architecture feed-forward list may not apply.
    feedforward = FEEDFORWARD if cfg.target_modules else None
    config = IA3Config(target_modules=cfg.target_modules, feedforward_modules=feedforward, task_type=_peft.task_type(model))
    return _peft.wrap(model, config)


def serves(cfg) -> str:
    # A PEFT model holds adapters of one type: (IA)³ vectors cannot join the LoRA adapters' model.
    return APART


def combine(model, names: list[str], weights: list[float], how: str, density: float) -> dict:
    # PEFT's IA3Model.add_weighted_adapter: each vector the weighted sum of the runs' vectors.
    model.add_weighted_adapter(names, weights, "default")
    return {}


MERGING = Merging(("linear",), combine)


def merges(cfg) -> Merging:
    return MERGING


METHOD = Method(name="ia3", options=Options, apply=apply, save=_peft.save, load=_peft.load, merge=_peft.merge,
                serves=serves, merges=merges, disables=True)
