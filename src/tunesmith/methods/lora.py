"""LoRA through PEFT: low-rank updates on the chosen linear layers; the base stays frozen.

``use_dora`` learns each weight's magnitude apart from its direction (DoRA); ``use_rslora`` scales
the update by alpha/sqrt(r), which keeps high ranks learning (rsLoRA). Both merge into the base like
plain LoRA. A DoRA adapter is served in batches of its own and is not combined with others by
``tunesmith merge`` (``serves``, ``merges``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunesmith.methods import _peft
from tunesmith.methods.base import ALONE, MIXED, Merging, Method
from tunesmith.options import Section


class Options(Section):
    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str | None = Field(
        None, description="Module names to adapt; default: every linear layer of a causal LM, PEFT's "
        "per-architecture choice otherwise ('all-linear' for every linear)."
    )
    use_dora: bool = Field(False, description="DoRA: learn each weight's magnitude apart from its direction.")
    use_rslora: bool = Field(False, description="rsLoRA: scale updates by alpha/sqrt(r) instead of alpha/r.")


def default_targets(model) -> str | None:
    # A causal LM: every linear layer of attention and MLP (not the output head), which the QLoRA
    # paper found matters more than the rank. A classifier or seq2seq model: PEFT's per-architecture
    # default (query and value for BERT-style encoders, as in the LoRA paper).
    return "all-linear" if _peft.task_type(model) == "CAUSAL_LM" else None


def apply(model, cfg):
    from peft import LoraConfig

    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=cfg.target_modules or default_targets(model), use_dora=cfg.use_dora,
                        use_rslora=cfg.use_rslora, task_type=_peft.task_type(model))
    return _peft.wrap(model, config)


def serves(cfg) -> str:
    # PEFT routes rows to adapters in one batch (``adapter_names``) for plain LoRA only, not DoRA.
    return ALONE if cfg.use_dora else MIXED


# PEFT's LoraModel.add_weighted_adapter: weighted sums of the A and the B matrices (linear), an update
# sparsified to ``density`` with a sign elected per weight (ties, dare_ties), or the weighted sum of
# the full updates cut back to a rank by SVD (svd). All but svd need adapters of one rank.
HOWS = ("linear", "ties", "dare_ties", "svd")
SAME_RANK = ("linear", "ties", "dare_ties")


def one_rank(options: dict, how: str) -> str | None:
    if how in SAME_RANK and len({o.r for o in options.values()}) > 1:
        shown = ", ".join(f"{name} r={o.r}" for name, o in options.items())
        return f"--how {how}: needs adapters of one rank, got {shown}; use --how svd, or runs of one rank"
    return None


def combine(model, names: list[str], weights: list[float], how: str, density: float) -> dict:
    extra = {"density": density} if how in ("ties", "dare_ties") else {}
    model.add_weighted_adapter(names, weights, "default", combination_type=how, **extra)
    return {"r": model.peft_config["default"].r}


MERGING = Merging(HOWS, combine, one_rank)


def merges(cfg) -> Merging | None:
    # add_weighted_adapter sums the A and B matrices; a DoRA adapter's magnitudes would be lost.
    return None if cfg.use_dora else MERGING


METHOD = Method(name="lora", options=Options, apply=apply, save=_peft.save, load=_peft.load, merge=_peft.merge,
                serves=serves, merges=merges, disables=True)
