"""Training data from served traffic that people rated, plus replay of the original training data.

A rating vouches for one training row, or for none:
- a run with labels (a classifier, or label answers on a causal model): the rating's ``label`` when
  it is one of the run's labels (a person said what the right class was); else the model's own
  answer when the score says it was right (``score >= min_score``; thumbs up is 1.0);
- a generative run: the prompt and the model's answer, when ``score >= min_score``.
An input counts once: each of its raters' latest rating is a verdict, and the input gives the row
its raters agree on (``store.consensus``: ``--min-raters``, ``--agreement``). A served answer is
rated only by the key that received it, so an input's raters are the clients that asked it.
Everything else is counted by reason and left out. Replay mixes in original training examples
(``replay`` of them per new one) so that the child does not forget what the parent knew.

Rows are written in one canonical schema, whatever the user's columns were: ``{"text", "label"}``
for label data, ``{"messages"}`` otherwise.

With ``--objective dpo`` (or reward) the child trains on pairs: each thumbs-up answer to a prompt
preferred to each thumbs-down answer to it (``rated_pairs``), and the rate page's choices between
two answers, one of them the adapter's (``store.db.preference_pairs``), as ``{"prompt", "chosen",
"rejected"}`` rows; a parent's pairs are replayed (``pair_rows``), an answer to imitate is not.

With ``--objective kto`` the thumbs themselves are the data: every served answer marked good or bad
(``store.db.rated_answers``), a thumbs down as much as a thumbs up, each prompt and answer once, as
``{"prompt", "completion", "label"}`` rows; the parent's own examples are replayed and scored as such
rows too (``kto_rows``: an imitated answer is a good one; a pair gives its chosen answer good and its
rejected one bad).
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
from collections import Counter
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.store.consensus import Consensus, latest


def user_text(prompt: str, instruction: str) -> str:
    """The user's own text in a served ``prompt``: where the prompt is the run's ``data.instruction``
    filled in (a client asking a run trained on label data sends the review inside the template the
    run was trained with, and the request log keeps the message as sent), the text that fills it;
    else the prompt as it is. The child's data keeps the parent's template, so a row must hold the
    text alone: else it would be templated twice, and a served review that is in the original test
    set would not be recognised as such."""
    if instruction == "{text}":
        return prompt
    pieces = [re.escape(p.replace("{{", "{").replace("}}", "}")) for p in instruction.split("{text}")]
    found = re.fullmatch("(.*?)".join(pieces), prompt, flags=re.DOTALL)
    if found is None or len(set(found.groups())) != 1:  # not this template, or {text} twice with two texts
        return prompt
    return found.group(1)


def row_of(rating, labels: list[str], min_score: float) -> tuple[dict | None, str | None]:
    """The training row one rating vouches for, or None and why not."""
    good = rating["score"] is not None and rating["score"] >= min_score
    if labels:
        if rating["label"] is not None:
            if rating["label"] in labels:
                return {"text": rating["prompt"], "label": rating["label"]}, None
            return None, "label_not_a_run_label"
        if good and rating["answer"].strip() in labels:
            return {"text": rating["prompt"], "label": rating["answer"].strip()}, None
        return None, "no_right_label"
    if good:
        return {"messages": [{"role": "user", "content": rating["prompt"]},
                             {"role": "assistant", "content": rating["answer"]}]}, None
    return None, "score_below_min"


def rated_rows(ratings, labels: list[str], min_score: float = 1.0,
               consensus: Consensus = Consensus(), instruction: str = "{text}") -> tuple[list[dict], Counter]:
    """Canonical training rows from rated answers, one per input, and the inputs left out, by reason.

    An input's raters are the keys that rated an answer to it (each one's latest rating); each rating
    vouches for a row or for none (``row_of``), and the input gives its most common verdict that
    ``consensus`` supports (``store.consensus``; between equals, the latest)."""
    verdicts = []
    for rating in ratings:
        if labels:  # label rows hold the user's text; the child's data template wraps it again
            rating = {**dict(rating), "prompt": user_text(rating["prompt"], instruction)}
        row, why = row_of(rating, labels, min_score)
        verdict = ("row", json.dumps(row, sort_keys=True)) if row else ("left_out", why)
        verdicts.append((rating["prompt"], rating["rater"], verdict))
    rows, skipped = [], Counter()
    for by_rater in latest(verdicts).values():
        support = consensus.support(by_rater)
        if support.left_out:
            skipped[support.left_out] += 1
        elif support.verdict[0] == "row":
            rows.append(json.loads(support.verdict[1]))
        else:
            skipped[support.verdict[1]] += 1
    return rows, skipped


def input_of(row: dict) -> str:
    """What the model reads of a canonical row: its text, its prompt, or its non-assistant messages."""
    if "text" in row:
        return row["text"]
    if "prompt" in row:
        return row["prompt"] if isinstance(row["prompt"], str) else input_of({"messages": row["prompt"]})
    return "\n".join(m["content"] for m in row["messages"] if m["role"] != "assistant")


def item_of(row: dict) -> tuple:
    """What counts once: a row's input; for a KTO row, its input and its answer (every answer to a
    prompt is marked on its own); for a pair, its input and both answers."""
    answers = [row[k] for k in ("completion", "chosen", "rejected") if k in row]
    return (input_of(row), *map(json.dumps, answers))


def unseen(rows: list[dict], known: list[dict]) -> tuple[list[dict], int]:
    """``rows`` without repeats (``item_of``), and without inputs of ``known`` (the original test set,
    which the gate scores on: training on its rows would flatter the child). Returns the number dropped."""
    tested = {input_of(r) for r in known}
    seen, kept = set(), []
    for row in rows:
        if input_of(row) not in tested and item_of(row) not in seen:
            seen.add(item_of(row))
            kept.append(row)
    return kept, len(rows) - len(kept)


def canonical(example: dict) -> dict:
    """A prepared example (``data.format.to_examples``) as a canonical row."""
    if "label" in example:
        return {"text": example["_input"], "label": example["label"]}
    if "messages" in example:
        return {"messages": example["messages"]}
    raise TunesmithError("retrain: the run trained on plain text (continued pre-training); there is no "
                         "prompt to rate, so there is nothing to re-train on")


def kto_rows(example: dict) -> list[dict]:
    """A prepared example (``data.format.to_examples``) as canonical KTO rows: an answer marked good
    or bad as it is; a pair's chosen answer good and its rejected one bad; an answer to imitate good."""
    messages = example.get("messages")
    if "desirable" in example:
        return [{"prompt": messages, "completion": example["completion"], "label": example["desirable"]}]
    if "chosen" in example:
        return [{"prompt": messages, "completion": example["chosen"], "label": True},
                {"prompt": messages, "completion": example["rejected"], "label": False}]
    if messages and messages[-1]["role"] == "assistant" and "label" not in example:
        return [{"prompt": messages[:-1], "completion": messages[-1]["content"], "label": True}]
    raise TunesmithError("retrain --objective kto: the run trained on label data or plain text; KTO needs "
                         "answers to prompts")


def pair_rows(example: dict) -> list[dict]:
    """A prepared example as a canonical pair: a pair as it is; an answer to imitate, or a mark, has no
    second answer to prefer it to, and gives none."""
    if "chosen" in example:
        return [{"prompt": example["messages"], "chosen": example["chosen"], "rejected": example["rejected"]}]
    return []


def rated_pairs(marked: list[dict]) -> tuple[list[dict], Counter]:
    """Pairs from answers marked good or bad (``store.db.rated_answers``): each good answer to a prompt
    preferred to each bad answer to it, and the prompts that give none (``one_sided``: all their
    answers marked alike)."""
    by_prompt: dict[str, dict[bool, list[str]]] = {}
    for row in marked:
        by_prompt.setdefault(row["prompt"], {True: [], False: []})[row["label"]].append(row["completion"])
    pairs, skipped = [], Counter()
    for prompt, answers in by_prompt.items():
        if not (answers[True] and answers[False]):
            skipped["one_sided"] += 1
        pairs += [{"prompt": prompt, "chosen": good, "rejected": bad}
                  for good in answers[True] for bad in answers[False]]
    return pairs, skipped


def hold_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded split of the new rows by input: (to train on, held out for the gate). The rows of one
    input (pairs or marked answers to one prompt) fall on one side, so the gate scores inputs the
    child never trained on."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(input_of(row), []).append(row)
    shuffled = list(groups.values())
    random.Random(seed).shuffle(shuffled)
    held = max(1, round(len(shuffled) * fraction))
    return [r for g in shuffled[held:] for r in g], [r for g in shuffled[:held] for r in g]


def replay(original: list[dict], new_count: int, ratio: float, seed: int) -> list[dict]:
    """``ratio`` original rows per new row (all of them when there are fewer), a seeded sample."""
    n = min(len(original), round(new_count * ratio))
    return random.Random(seed).sample(original, n)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
