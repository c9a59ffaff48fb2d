"""Fine-tuning methods, registered in one place.

A method turns a pretrained model into one whose trainable parameters are the method's own, saves
and loads just those, and says whether it can merge into the base. Each method module declares its
own typed ``Options``; config.py builds the ``method:`` union from this registry. Adding a method
means one module here, one line in ``REGISTRY`` and one row in the test matrix.
"""

from __future__ import annotations

from tunesmith.errors import TunesmithError
from tunesmith.methods import adapter, full, ia3, lora, prefix, prompt, ptuning, qlora
from tunesmith.methods.base import Method

REGISTRY: dict[str, Method] = {
    "full": full.METHOD,
    "lora": lora.METHOD,
    "qlora": qlora.METHOD,
    "ia3": ia3.METHOD,
    "prefix": prefix.METHOD,
    "prompt": prompt.METHOD,
    "ptuning": ptuning.METHOD,
    "adapter": adapter.METHOD,
}


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise TunesmithError(f"method.name: unknown method {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
