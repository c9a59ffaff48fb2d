"""What the PEFT-backed methods share: wrapping with readable errors, and saving in PEFT's format."""

from __future__ import annotations

from pathlib import Path

from tunesmith.errors import TunesmithError


def module_names(model) -> str:
    """The distinct last components of the model's module names, for error messages."""
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}))


def wrap(model, peft_config):
    """``get_peft_model`` with a user-facing error when the target modules match nothing."""
    from peft import NoMatchingPeftModuleError, get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except NoMatchingPeftModuleError:
        targets = peft_config.target_modules  # PEFT turns a list into a set
        shown = ", ".join(sorted(targets)) if isinstance(targets, set) else targets
        raise TunesmithError(
            f"method.target_modules: {shown} match no module; "
            f"module names found: {module_names(model)}"
        ) from None


def task_type(model) -> str:
    """PEFT's task type for this model; SEQ_CLS also makes the new classification head trainable."""
    if type(model).__name__.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if getattr(model.config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return "CAUSAL_LM"


def require_attention(model, method: str) -> None:
    """PEFT's prompt-learning methods size their virtual tokens from the attention heads."""
    config = model.config.get_text_config()
    if getattr(config, "num_attention_heads", None) is None:
        raise TunesmithError(
            f"method.name: {method} needs a decoder with attention layers; model type "
            f"{model.config.model_type!r} has none (use lora, ia3 or adapter)"
        )


def save(model, path: Path) -> None:
    model.save_pretrained(path)


def load(base, path: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, path)


def merge(model):
    return model.merge_and_unload()
