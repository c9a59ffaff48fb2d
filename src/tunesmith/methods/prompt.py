"""Prompt tuning through PEFT: learned input embeddings put before each row's tokens.

They start from the embeddings of ``prompt_init_text`` when given (read with the model's own
tokenizer), otherwise from embeddings of randomly drawn vocabulary tokens, which train better than
random vectors (Lester et al., 2021). One example per row (``packs=False``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunesmith.methods import _peft
from tunesmith.methods.base import Method
from tunesmith.options import Section


class Options(Section):
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, ge=1)
    prompt_init_text: str | None = Field(
        None, min_length=1, description="Start the virtual tokens from this text's embeddings."
    )


def apply(model, cfg):
    from peft import PromptTuningConfig, PromptTuningInit

    _peft.require_attention(model, "prompt")
    if cfg.prompt_init_text:
        # The base model's directory or hub id holds its tokenizer (converted GGUF models are saved with it).
        init = {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": cfg.prompt_init_text,
                "tokenizer_name_or_path": model.config._name_or_path}
    else:
        init = {"prompt_tuning_init": PromptTuningInit.SAMPLE_VOCAB}
    config = PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM", **init)
    return _peft.wrap(model, config)


METHOD = Method(name="prompt", options=Options, apply=apply, save=_peft.save, load=_peft.load, direct_decoder=False,
                packs=False, disables=True)
