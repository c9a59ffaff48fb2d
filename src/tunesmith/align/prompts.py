"""PPO's prompts: read from a file (or builtin data), filtered, deduplicated, cut to length, and
split into training prompts and held-out prompts for the report."""

from __future__ import annotations

import random

from tunesmith.align.options import PPOOptions
from tunesmith.data.io import read_records
from tunesmith.data.pipeline import resolve_data_path
from tunesmith.errors import TunesmithError


def load_prompts(cfg: PPOOptions, seed: int) -> tuple[list[str], list[str]]:
    """``(training prompts, held-out prompts)``, each the user turn with ``cfg.instruction`` filled in."""
    records = read_records(resolve_data_path(cfg.prompts))
    for column in [cfg.prompt_column, *cfg.prompt_filter]:
        if records and column not in records[0]:
            raise TunesmithError(f"ppo.prompts: {cfg.prompts} has no column {column!r} "
                                 f"(columns: {', '.join(k for k in records[0] if not k.startswith('_'))})")
    texts = {}
    for r in records:
        if all(str(r.get(k)) == v for k, v in cfg.prompt_filter.items()) and str(r[cfg.prompt_column] or "").strip():
            texts.setdefault(_cut(str(r[cfg.prompt_column]).strip(), cfg.max_prompt_chars), None)
    texts = list(texts)
    random.Random(seed).shuffle(texts)
    if cfg.max_prompts:
        texts = texts[: cfg.max_prompts]
    if len(texts) <= cfg.eval_prompts:
        raise TunesmithError(f"ppo.prompts: {cfg.prompts}: {len(texts)} distinct prompts, not more than "
                             f"ppo.eval_prompts ({cfg.eval_prompts}); none would be left to train on")
    framed = [cfg.instruction.format(text=t) for t in texts]
    return framed[cfg.eval_prompts:], framed[: cfg.eval_prompts]


def prompts_of_step(prompts: list[str], step: int, per_step: int, seed: int) -> list[str]:
    """The prompts of PPO step ``step`` (from 0): consecutive slices of a seeded order reshuffled every
    pass, a pure function of the step so that a resumed run takes the same prompts."""
    out = []
    for index in range(step * per_step, (step + 1) * per_step):
        epoch, position = divmod(index, len(prompts))
        order = list(range(len(prompts)))
        random.Random(seed + epoch).shuffle(order)
        out.append(prompts[order[position]])
    return out


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return (cut or text[:limit]) + " ..."
