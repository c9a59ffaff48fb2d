"""Preference data: pairs (a prompt, the answer people chose and the one they rejected), and
unpaired answers marked good or bad (a prompt, an answer and a thumbs up or down).

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

Unpaired answers (``data.format: unpaired_preference``, or any file with prompt, completion and a
``label``/``desirable``/``thumbs`` column), as TRL's KTO data and ``tunesmith feedback export --as kto``
write them: ``{"prompt": "...", "completion": "...", "label": true}``, the prompt text or messages,
the completion text or one assistant message, the mark a boolean or a thumbs-like value
(``GOOD``/``BAD``). Each becomes ``{"messages": prompt messages, "completion": str, "desirable": bool}``.
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


# What a good/bad column may hold, besides booleans and the numbers 1 (good), 0 and -1 (bad);
# compared lower-cased, without surrounding spaces.
GOOD = ("true", "1", "1.0", "+1", "yes", "good", "up", "thumbs up", "thumbs_up", "desirable", "\N{THUMBS UP SIGN}")
BAD = ("false", "0", "0.0", "-1", "no", "bad", "down", "thumbs down", "thumbs_down", "undesirable",
       "\N{THUMBS DOWN SIGN}")


def to_unpaired(record: dict, columns: dict[str, str], where: str) -> dict:
    """The canonical example of one cleaned row of unpaired answers (see the module docstring)."""
    prompt = _messages(record[columns["prompt"]], "user", where, columns["prompt"])
    return {"messages": prompt, "completion": _answer(record[columns["completion"]], where, columns["completion"]),
            "desirable": desirable(record.get(columns["desirable"]), where, columns["desirable"]),
            "_input": "\n".join(m["content"] for m in prompt if m["role"] != "assistant")}


def desirable(value, where: str, column: str) -> bool:
    """Whether a good/bad mark says good: a boolean, 1 / 0 / -1, or a word of ``GOOD`` or ``BAD``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (1, 0, -1):
        return value == 1
    if isinstance(value, str) and value.strip().lower() in GOOD + BAD:
        return value.strip().lower() in GOOD
    raise TunesmithError(f"{where}: column {column!r} must say whether the answer is good: true/false, 1/0, "
                         f"good/bad, up/down or yes/no; found {value!r}")


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


def rotten_tomatoes_thumbs(records: list[dict]) -> list[dict]:
    """``builtin:rotten_tomatoes_thumbs``: the films of ``builtin:rotten_tomatoes_pairs``, each once, as
    unpaired answers for KTO: the fresh review marked good for the first film and every other one after
    it (in the pairs' order, by film name), the rotten review marked bad for the rest.

    One answer per film, so that every prompt is distinct (the leakage audit compares prompts) and no
    film gives both a good and a bad answer: the data is unpaired, as thumbs on served answers are.
    """
    return [{"prompt": pair["prompt"], "completion": pair["chosen"] if k % 2 == 0 else pair["rejected"],
             "label": k % 2 == 0, "film": pair["film"]}
            for k, pair in enumerate(rotten_tomatoes_pairs(records))]
