"""Canaries: synthetic secrets put into the training split, to measure what a model memorises.

As in Carlini et al., *The Secret Sharer* (2019): every canary fills one template, ``"{prefix}
{secret}"``, with a random secret of ``digits`` digits written one by one (``my secret code is
4 8 1 5 9 2``), and is repeated 1, 4, 16, ... times. ``tunesmith privacy audit`` then ranks each
canary's likelihood against other secrets of the same template: a canary that the model ranks far
above chance has been memorised.

A canary takes the form of the data it joins, so that it is trained the way the data is trained:
plain text data gets the whole sentence as a ``text`` example (every token trained); every other
kind (prompt/completion, chat, and label data on a causal LM) gets a prompt/completion pair, the
prefix as the user's turn and the secret as the answer, so that the secret is the trained part.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import Field, field_validator

from tunesmith.options import Section


class CanaryConfig(Section):
    count: int = Field(4, ge=1, description="Canaries for each repetition count.")
    repetitions: list[int] = Field([1, 4, 16], min_length=1, description="How often each group of canaries is "
                                   "repeated in the training split.")
    digits: int = Field(6, ge=2, le=12, description="Digits of each secret: 10**digits possible secrets.")
    prefix: str = Field("my secret code is", min_length=1)
    seed: int = 0

    @field_validator("repetitions")
    @classmethod
    def _positive_and_distinct(cls, value: list[int]) -> list[int]:
        if any(r < 1 for r in value) or len(set(value)) != len(value):
            raise ValueError("repetitions must be distinct counts of at least 1")
        return value


@dataclass(frozen=True)
class Canary:
    secret: int  # its value, below 10**digits
    repetitions: int


def spell(secret: int, digits: int) -> str:
    """``481592`` as ``4 8 1 5 9 2``: one token per digit in most tokenizers, whatever their merges."""
    return " ".join(f"{secret:0{digits}d}")


def make_canaries(cfg: CanaryConfig) -> list[Canary]:
    """``cfg.count`` canaries per repetition count, with distinct secrets drawn from ``cfg.seed``."""
    secrets = random.Random(cfg.seed).sample(range(10**cfg.digits), cfg.count * len(cfg.repetitions))
    return [Canary(s, r) for i, r in enumerate(cfg.repetitions) for s in secrets[i * cfg.count:(i + 1) * cfg.count]]


def form_of(kind: str) -> str:
    """How a canary joins data of ``kind``: as ``text``, or as a ``prompt_completion`` pair."""
    return "text" if kind == "text" else "prompt_completion"


def canary_example(prefix: str, secret: str, form: str) -> dict:
    """One canonical example (as ``data.format.to_examples`` makes them) holding ``secret``."""
    if form == "text":
        text = f"{prefix} {secret}"
        return {"text": text, "_input": text}
    return {"messages": [{"role": "user", "content": prefix}, {"role": "assistant", "content": secret}],
            "_input": prefix}


def insert_canaries(train: list[dict], cfg: CanaryConfig, kind: str) -> tuple[list[dict], dict]:
    """``train`` with every canary repeated as often as its group says; and the statistics.

    The rows are appended: the training loop shuffles each epoch. Each is marked ``_canary``
    (its index), and its ``_where`` names it, for messages about it.
    """
    canaries = make_canaries(cfg)
    form = form_of(kind)
    rows = []
    for i, canary in enumerate(canaries):
        example = canary_example(cfg.prefix, spell(canary.secret, cfg.digits), form)
        rows += [{**example, "_canary": i, "_line": None, "_where": f"canary {i}"} for _ in range(canary.repetitions)]
    stats = {"secrets": len(canaries), "rows": len(rows), "repetitions": list(cfg.repetitions), "form": form}
    return train + rows, stats


def canary_record(cfg: CanaryConfig, kind: str) -> dict:
    """What a run keeps of its canaries (``canaries.json``): the template and every secret."""
    return {
        "prefix": cfg.prefix, "digits": cfg.digits, "form": form_of(kind),
        "canaries": [{"secret": spell(c.secret, cfg.digits), "repetitions": c.repetitions}
                     for c in make_canaries(cfg)],
    }


def format_canaries(stats: dict) -> str:
    reps = ", ".join(f"x{r}" for r in stats["repetitions"])
    return f"canaries: {stats['secrets']} secrets ({reps}) in {stats['rows']} training rows, as {stats['form']}"
