"""The prompts of PPO and GRPO: read from a file (or builtin data), filtered, deduplicated, cut to
length, split into training prompts and held-out prompts for the report, and framed as the policy
reads them. Each keeps its row, which GRPO's rewards read. ``inspect_prompts`` audits them for
``tunesmith data inspect``, from the same code."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from tunesmith.align.options import GRPOConfig, PPOConfig, RolloutOptions
from tunesmith.data.format import Encoder
from tunesmith.data.io import read_records
from tunesmith.data.leakage import audit_leakage
from tunesmith.data.pipeline import resolve_data_path
from tunesmith.errors import TunesmithError
from tunesmith.model import load_tokenizer, resolve_model

SHOWN_PROMPTS = 3  # example prompts that `data inspect` prints
_SHOWN_CHARS = 200
T = TypeVar("T")


@dataclass
class Prompts:
    """The prompt column's values, filtered, deduplicated and cut, in a seeded order, and the row each
    came from (its first, less the reader's own ``_`` columns); the first ``held_out`` of them are held
    out for the report. ``stats``: rows read, dropped by reason, cut."""

    texts: list[str]
    rows: list[dict]
    held_out: int
    instruction: str
    stats: dict

    def split(self) -> tuple[list[str], list[str]]:
        """``(training prompts, held-out prompts)``, each the user turn with the instruction filled in."""
        framed = [self.instruction.format(text=t) for t in self.texts]
        return framed[self.held_out:], framed[: self.held_out]

    def split_rows(self) -> tuple[list[dict], list[dict]]:
        """The rows of ``split``'s prompts, in the same order."""
        return self.rows[self.held_out:], self.rows[: self.held_out]


def read_prompts(cfg: RolloutOptions, seed: int) -> Prompts:
    """The prompts of ``cfg.prompts``, and how many rows each step of the selection dropped."""
    at = cfg.section
    try:
        records = read_records(resolve_data_path(cfg.prompts))
    except TunesmithError as err:  # the data layer's messages name its own section, data:
        raise TunesmithError(*(f"{at}.prompts: {p.removeprefix('data: ')}" for p in err.problems)) from None
    columns = [(f"{at}.prompt_column", cfg.prompt_column), *((f"{at}.prompt_filter", c) for c in cfg.prompt_filter)]
    for field, column in columns:
        if records and column not in records[0]:
            raise TunesmithError(f"{field}: {cfg.prompts} has no column {column!r} "
                                 f"(columns: {', '.join(prompt_columns(records[0]))})")
    wanted = {k: {v} if isinstance(v, str) else set(v) for k, v in cfg.prompt_filter.items()}
    dropped: Counter = Counter()
    cut: dict[str, bool] = {}  # distinct prompt -> whether max_prompt_chars shortened it
    rows: dict[str, dict] = {}
    for r in records:
        text = str(r.get(cfg.prompt_column) or "").strip()
        if not all(str(r.get(k)) in values for k, values in wanted.items()):
            dropped["not_in_prompt_filter"] += 1
        elif not text:
            dropped["empty"] += 1
        elif (short := _cut(text, cfg.max_prompt_chars)) in cut:
            dropped["duplicate"] += 1  # counted after the cut: two prompts that only differ beyond it are one
        else:
            cut[short] = short != text
            rows[short] = {k: v for k, v in r.items() if not k.startswith("_")}
    texts = list(cut)
    random.Random(seed).shuffle(texts)
    if cfg.max_prompts and len(texts) > cfg.max_prompts:
        dropped["over_max_prompts"] += len(texts) - cfg.max_prompts
        texts = texts[: cfg.max_prompts]
    if len(texts) <= cfg.eval_prompts:
        raise TunesmithError(f"{at}.prompts: {cfg.prompts}: {len(texts)} distinct prompts, not more than "
                             f"{at}.eval_prompts ({cfg.eval_prompts}); none would be left to train on (rows "
                             f"read {len(records)}, dropped: {_reasons(dropped)})")
    stats = {"rows_read": len(records), "rows_dropped": dict(dropped),
             "prompts": {"train": len(texts) - cfg.eval_prompts, "held_out": cfg.eval_prompts},
             "cut": sum(cut[t] for t in texts)}
    return Prompts(texts, [rows[t] for t in texts], cfg.eval_prompts, cfg.instruction, stats)


def prompt_columns(row: dict) -> list[str]:
    """The columns of a prompts file, as its rows have them (less the reader's own ``_`` columns)."""
    return [k for k in row if not k.startswith("_")]


def load_prompts(cfg: RolloutOptions, seed: int) -> tuple[list[str], list[str]]:
    """``(training prompts, held-out prompts)``, each the user turn with ``cfg.instruction`` filled in."""
    return read_prompts(cfg, seed).split()


def framing(config: PPOConfig | GRPOConfig):
    """``(tokenizer, encoder)``: the policy's tokenizer, and the framing of its prompts (the chat
    template, or plain text without one, and the system prompt of the config's rollout section)."""
    tokenizer = load_tokenizer(resolve_model(config.model.name))
    return tokenizer, Encoder(tokenizer, "chat" if tokenizer.chat_template else "plain", config.rollout.system_prompt)


def framed(encoder: Encoder, prompt: str) -> str:
    """A prompt (the user turn, the config's ``instruction`` already filled in) as the policy reads it."""
    return encoder.prompt_text({"messages": [{"role": "user", "content": prompt}]})


def prompts_of_step(prompts: Sequence[T], step: int, per_step: int, seed: int) -> list[T]:
    """The prompts of step ``step`` (from 0): consecutive slices of a seeded order reshuffled every
    pass, a pure function of the step so that a resumed run takes the same prompts."""
    out = []
    for index in range(step * per_step, (step + 1) * per_step):
        epoch, position = divmod(index, len(prompts))
        order = list(range(len(prompts)))
        random.Random(seed + epoch).shuffle(order)
        out.append(prompts[order[position]])
    return out


def inspect_prompts(config: PPOConfig | GRPOConfig) -> dict:
    """What ``tunesmith data inspect`` shows of a PPO or GRPO config's prompts: rows read and dropped, prompts
    kept and cut, held-out prompts that (nearly) repeat a training prompt (reported, not removed: PPO
    holds them out as they are), lengths in characters and in tokens as the policy reads them, what
    ``train.max_steps`` draws from them, and a few of them."""
    cfg = config.rollout
    prompts = read_prompts(cfg, config.train.seed)
    stats = {**prompts.stats, "section": cfg.section}
    held_out, train = prompts.texts[: prompts.held_out], prompts.texts[prompts.held_out:]
    _, leakage = audit_leakage({"train": [{"text": t} for t in train], "test": [{"text": t} for t in held_out]},
                               lambda r: r["text"])
    stats["leakage"] = {"held_out": leakage["test"], "examples": leakage["examples"]}
    stats["chars"] = _percentiles([len(t) for t in prompts.texts])
    tokenizer, encoder = framing(config)
    train_framed, held_out_framed = prompts.split()
    lengths = [len(tokenizer(framed(encoder, p), add_special_tokens=False).input_ids)
               for p in [*train_framed, *held_out_framed]]
    stats["tokens"] = {**_percentiles(lengths), "max_new_tokens": cfg.max_new_tokens}
    drawn = config.train.max_steps * cfg.prompts_per_step
    stats["steps"] = {"steps": config.train.max_steps, "prompts_per_step": cfg.prompts_per_step, "drawn": drawn,
                      "passes": drawn / len(train), "answers": drawn * cfg.samples_per_prompt}
    stats["examples"] = train_framed[:SHOWN_PROMPTS]
    return stats


def format_prompt_stats(stats: dict) -> str:
    """``inspect_prompts``'s statistics for the terminal, in the shape of the training data's."""
    dropped = stats["rows_dropped"]
    tokens, steps, leak, at = stats["tokens"], stats["steps"], stats["leakage"], stats["section"]
    lines = [
        f"rows read: {stats['rows_read']}",
        f"rows dropped: {_reasons(dropped)}",
        f"prompts kept: train {stats['prompts']['train']}, held out {stats['prompts']['held_out']} "
        f"({at}.eval_prompts); cut at {at}.max_prompt_chars: {stats['cut']}",
        f"held-out prompts repeating a training prompt (not removed): exact {leak['held_out']['exact']} "
        f"near {leak['held_out']['near']}",
        "characters: " + _format_percentiles(stats["chars"]),
        "tokens, as the policy reads them: " + _format_percentiles(tokens)
        + f"; with {at}.max_new_tokens {tokens['max_new_tokens']}: at most "
        f"{tokens['max'] + tokens['max_new_tokens']}",
        f"steps: {steps['steps']} x {steps['prompts_per_step']} prompts = {steps['drawn']} drawn, "
        f"{steps['passes']:.2f} passes over the training prompts; {steps['answers']} answers sampled",
    ]
    lines += [f"{ex['kind']} duplicate of a training prompt (similarity {ex['similarity']:.2f}): {ex['text'][:80]!r} ~ "
              f"{ex['match'][:80]!r}" for ex in leak["examples"]]
    lines += [f"prompt: {p[:_SHOWN_CHARS]!r}" + (" ..." if len(p) > _SHOWN_CHARS else "") for p in stats["examples"]]
    return "\n".join(lines)


def _reasons(dropped: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"


def _percentiles(values: list[int]) -> dict:
    p = np.percentile(values, [50, 90, 99])
    return {"p50": int(p[0]), "p90": int(p[1]), "p99": int(p[2]), "max": int(max(values))}


def _format_percentiles(p: dict) -> str:
    return f"p50 {p['p50']} p90 {p['p90']} p99 {p['p99']} max {p['max']}"


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return (cut or text[:limit]) + " ..."
