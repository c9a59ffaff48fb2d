"""Preference pairs: a prompt, the answer people chose and the one they rejected.

Three shapes of row are read (``data.format: preference``, or any file with ``chosen`` and
``rejected`` columns):

- plain columns: ``{"prompt": "...", "chosen": "...", "rejected": "..."}``, the common JSONL of
  public preference sets, and what ``tunesmith feedback export`` writes;
- chat messages with a prompt column: the prompt a string or a list of messages, each answer a
  string or a list holding one assistant message;
- chat messages without a prompt: two whole conversations, the prompt being the messages they
  share and each answer its last (assistant) message.

Every shape becomes ``{"messages": prompt messages, "chosen": str, "rejected": str}`` (plus
``margin`` when the data has one), whose ``_input`` (what the leakage audit compares) is the
prompt. Pairs whose two answers are the same after cleaning teach nothing, and are dropped and
counted as ``identical_pair``.
"""

from __future__ import annotations

from tunesmith.errors import TunesmithError


def to_pair(record: dict, columns: dict[str, str], where: str) -> dict:
    """The canonical example of one cleaned row (see the module docstring for the shapes)."""
    chosen, rejected = record[columns["chosen"]], record[columns["rejected"]]
    if "prompt" in columns:
        prompt = _messages(record[columns["prompt"]], "user", where, columns["prompt"])
        chosen_answer = _answer(chosen, where, columns["chosen"])
        rejected_answer = _answer(rejected, where, columns["rejected"])
    else:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise TunesmithError(f"{where}: without a prompt column, {columns['chosen']!r} and "
                                 f"{columns['rejected']!r} must be conversations (lists of messages)")
        chosen, rejected = _messages(chosen, "user", where, columns["chosen"]), _messages(rejected, "user", where, columns["rejected"])
        prompt = chosen[:-1]
        if rejected[:-1] != prompt or not prompt:
            raise TunesmithError(f"{where}: the chosen and rejected conversations must share every message "
                                 "but their last (the prompt), or give a prompt column")
        chosen_answer = _answer(chosen[-1:], where, columns["chosen"])
        rejected_answer = _answer(rejected[-1:], where, columns["rejected"])
    example = {"messages": prompt, "chosen": chosen_answer, "rejected": rejected_answer,
               "_input": "\n".join(m["content"] for m in prompt if m["role"] != "assistant")}
    if "margin" in columns:
        example["margin"] = _number(record.get(columns["margin"]), where, columns["margin"])
    return example


def drop_identical(examples: list[dict]) -> tuple[list[dict], int]:
    """The pairs whose answers differ, and how many did not."""
    kept = [e for e in examples if e["chosen"] != e["rejected"]]
    return kept, len(examples) - len(kept)


def _messages(value, role: str, where: str, column: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise TunesmithError(f"{where}: column {column!r} must hold text or a list of {{role, content}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _answer(value, where: str, column: str) -> str:
    if isinstance(value, str):
        return value
    messages = _messages(value, "assistant", where, column)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise TunesmithError(f"{where}: column {column!r} must hold one assistant message, "
                             f"found roles {[m['role'] for m in messages]}")
    return messages[0]["content"]


def _number(value, where: str, column: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TunesmithError(f"{where}: column {column!r} must hold a number, found {value!r}") from None


def rotten_tomatoes_pairs(records: list[dict]) -> list[dict]:
    """``builtin:rotten_tomatoes_pairs``: for every film of the Rotten Tomatoes corpus with a plot
    synopsis and both kinds of review, the prompt "Write a positive review of this film: PLOT", a
    fresh review of it chosen and a rotten one rejected.

    One pair per film, so that every prompt is distinct and a held-out pair's film is never seen in
    training (the leakage audit compares prompts). The first review of each kind in the corpus'
    order is taken: the same pairs on every machine.
    """
    films: dict[str, dict[str, str]] = {}
    for r in records:
        kinds = films.setdefault(r["movie_name"], {})
        kinds.setdefault(r["category"], r["text"])
    return [{"prompt": f"Write a positive review of this film: {kinds['plot']}", "chosen": kinds["fresh"],
             "rejected": kinds["rotten"], "film": film}
            for film, kinds in sorted(films.items()) if {"plot", "fresh", "rotten"} <= kinds.keys()]
