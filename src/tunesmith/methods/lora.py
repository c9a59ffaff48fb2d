"""LoRA through PEFT: low-rank updates on the chosen linear layers; the base stays frozen."""

from __future__ import annotations

from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.methods.base import Method


def default_targets(model) -> str | list[str]:
    # Every linear layer of attention and MLP (not the output head): the QLoRA paper found this
    # matters more than the rank; PEFT resolves "all-linear" for any architecture.
    return "all-linear"


def apply(model, cfg):
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules or default_targets(model)
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        if "not found in the base model" not in str(err) and "Target modules" not in str(err):
            raise
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        raise TunesmithError(
            f"method.target_modules: {targets} match no module; module names found: {', '.join(names)}"
        ) from None


def save(model, path: Path) -> None:
    model.save_pretrained(path)


def load(base, path: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, path)


METHOD = Method(name="lora", apply=apply, save=save, load=load, merge=lambda m: m.merge_and_unload())
