"""P-tuning through PEFT: virtual input tokens produced by a small MLP (the prompt encoder).

Put before each row's tokens, like prompt tuning; the encoder makes them train faster and more
stably than free embeddings (Liu et al., 2021). One example per row (``packs=False``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunesmith.methods import _peft
from tunesmith.methods.base import Method
from tunesmith.options import Section


class Options(Section):
    name: Literal["ptuning"] = "ptuning"
    num_virtual_tokens: int = Field(20, ge=1)


def apply(model, cfg):
    from peft import PromptEncoderConfig

    _peft.require_attention(model, "ptuning")
    return _peft.wrap(model, PromptEncoderConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM"))


METHOD = Method(name="ptuning", options=Options, apply=apply, save=_peft.save, load=_peft.load, direct_decoder=False,
                packs=False, disables=True)
