"""Prefix tuning through PEFT: learned keys and values that every layer's attention sees first.

The prefix reaches the model as a key/value cache, so it adds no positions to the logits. It is
prepended once per row, so rows hold one example each (``packs=False``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunesmith.methods import _peft
from tunesmith.methods.base import Method
from tunesmith.options import Section


class Options(Section):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, ge=1)


def apply(model, cfg):
    from peft import PrefixTuningConfig

    _peft.require_attention(model, "prefix")
    return _peft.wrap(model, PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM"))


METHOD = Method(name="prefix", options=Options, apply=apply, save=_peft.save, load=_peft.load, direct_decoder=False,
                packs=False, disables=True)
