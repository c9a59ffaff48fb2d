"""Scores of texts by a saved run: the one place where a run becomes a scorer. ``tunesmith score``
prints its scores; PPO (``align.rewards``) takes its rewards from the same scorers.

A run scores texts the way its objective declares (``Abilities.scores``); ``READERS`` has one entry
per way:

- ``reward``: a reward model's scalar head, on prompt and answer framed as it was trained;
- ``label``: the objective's ``label_logits`` over the run's labels: a classifier's head on the
  answer alone (it was trained on raw texts), or a causal run's log-likelihood of each label string
  as the answer to the run's own instruction around the answer.

A labelled run's score is the probability of one of its labels, and its reward (for PPO) that
label's log-odds; a reward model's score and reward are both its scalar.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError, prefixed
from tunesmith.objectives import abilities, lacks
from tunesmith.objectives.reward import score_texts
from tunesmith.session import load_run
from tunesmith.store import Run


@dataclass
class Scorer:
    what: str  # what a score is: "reward", or "P(positive)"
    score: Callable[[list[str]], list[float]]  # texts -> one score each
    frame: Callable[[str, str], str]  # (prompt, answer) -> the text to score, as the run was trained
    reward: Callable[[list[str]], list[float]]  # texts -> PPO's reward: the score, or a label's log-odds


def log_odds(logits: torch.Tensor, index: int) -> torch.Tensor:
    """``log p(index) - log(1 - p(index))`` under ``softmax(logits)``, per row; the logit difference
    with two labels."""
    others = torch.cat([logits[:, :index], logits[:, index + 1:]], dim=1)
    return logits[:, index] - torch.logsumexp(others, dim=1)


def label_scorer(run: Run, session, model, label: str, batch_size: int) -> Scorer:
    """A classifier, or a causal run on label data: the objective's ``label_logits`` over the run's labels."""
    labels = run.labels()
    index = labels.index(label)

    def logits(texts: list[str]) -> torch.Tensor:
        return session.objective.label_logits(model, texts, labels).float()

    # Both read the answer alone: a classifier was trained on texts, and a causal run puts its own
    # instruction around it (label_logits), not the prompt that asked for the answer.
    return Scorer(f"P({label})", lambda texts: torch.softmax(logits(texts), dim=1)[:, index].tolist(),
                  lambda prompt, answer: answer, lambda texts: log_odds(logits(texts), index).tolist())


def reward_model_scorer(run: Run, session, model, label: str | None, batch_size: int) -> Scorer:
    """A reward model: its scalar, on prompt and answer framed as in training (``objective.text``)."""
    def score(texts: list[str]) -> list[float]:
        return score_texts(model, session.tokenizer, texts, batch_size, session.config.data.max_length)

    return Scorer("reward", score, lambda prompt, answer: session.objective.text(
        [{"role": "user", "content": prompt}], answer), score)


@dataclass(frozen=True)
class Reader:
    """How a run of one objective becomes a scorer."""

    build: Callable[[Run, object, torch.nn.Module, str | None, int], Scorer]
    labelled: bool  # the score is about one of the run's labels


READERS = {
    "label": Reader(label_scorer, labelled=True),
    "reward": Reader(reward_model_scorer, labelled=False),
}


def scoring_run(path: str | Path) -> tuple[Run, Reader]:
    """The run at ``path`` and its reader; one line saying why when it cannot score, found before
    any model is loaded."""
    run = Run(path, writer=False)
    if not run.path.is_dir():
        raise TunesmithError(f"{run.path}: no such run directory")
    if not (run.path / "config.yaml").is_file():
        raise TunesmithError(f"{run.path}: not a tunesmith run directory (no config.yaml)")
    if kind := run.alignment():
        raise TunesmithError(f"{run.path} is a {kind.upper()} run, not a classifier or reward model")
    name = run.load_config().objective.name
    if why := lacks(name, "scores"):
        raise TunesmithError(f"{run.path} is a {name} run, not a classifier or reward model ({why})")
    reader = READERS[abilities(name).scores]
    if reader.labelled and not run.labels():
        raise TunesmithError(f"{run.path} is a {name} run without labels, not a classifier or reward model")
    return run, reader


def check_label(run: Run, label: str) -> None:
    labels = run.labels()
    if label not in labels:
        raise TunesmithError(f"{label!r} is not a label of {run.path} (its labels: {', '.join(labels) or 'none'})")


def default_label(labels: list[str]) -> str:
    """The label whose probability a labelled run scores unless told: ``positive`` if it has one, else
    its first (``labels.json``'s order, the model's outputs)."""
    return "positive" if "positive" in labels else labels[0]


def open_scorer(run: Run, reader: Reader, label: str | None, batch_size: int = 16,
                device: torch.device | str | None = None) -> Scorer:
    """The scorer of a run that ``scoring_run`` (and ``check_label``) passed: its model loaded."""
    run, session, model = load_run(run.path)
    if device is not None:
        model.to(device)
    return reader.build(run, session, model, label, batch_size)


def load_scorer(run_dir: str | Path, label: str | None = None, batch_size: int = 16,
                device: torch.device | str | None = None) -> Scorer:
    """The scorer of a reward-model run or a labelled run (``tunesmith score``).

    A labelled run scores the probability of ``label``; by default ``default_label``'s.
    """
    run, reader = scoring_run(run_dir)
    if reader.labelled:
        label = label or default_label(run.labels())
        with prefixed("--label: "):
            check_label(run, label)
    return open_scorer(run, reader, label, batch_size, device)
