"""Scores of texts by a saved run: a reward model's reward, or a classifier's probability of one
label (a sentiment classifier is a reward). ``tunesmith score`` prints them; PPO's rewards come
from the same ``load_scorer``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.objectives.reward import score_texts
from tunesmith.store import load_run


@dataclass
class Scorer:
    what: str  # what a score is: "reward", or "P(positive)"
    score: Callable[[list[str]], list[float]]  # texts -> one score each
    frame: Callable[[str, str], str]  # (prompt, answer) -> the text to score, as the run was trained


def load_scorer(run_dir: str | Path, label: str | None = None, batch_size: int = 16) -> Scorer:
    """The scorer of a reward-model run or a classification run.

    A classifier scores the probability of ``label``; by default the label named ``positive`` if
    the run has one, else the first of its labels (``labels.json``'s order, the model's outputs).
    """
    run, session, model = load_run(run_dir)
    objective, tokenizer = session.objective, session.tokenizer
    max_length = session.config.data.max_length
    name = session.config.objective.name
    if name == "reward":
        return Scorer("reward", lambda texts: score_texts(model, tokenizer, texts, batch_size, max_length),
                      lambda prompt, answer: objective.text([{"role": "user", "content": prompt}], answer))
    if name == "classification":
        labels = run.labels()
        chosen = label or ("positive" if "positive" in labels else labels[0])
        if chosen not in labels:
            raise TunesmithError(f"--label: {run.path} has no label {chosen!r}; its labels: {', '.join(labels)}")
        index = labels.index(chosen)

        def probabilities(texts: list[str]) -> list[float]:
            return objective.label_probabilities(model, texts, labels)[:, index].tolist()

        # A classifier reads the answer alone: it was trained on texts, not on prompts.
        return Scorer(f"P({chosen})", probabilities, lambda prompt, answer: answer)
    raise TunesmithError(f"{run.path}: a run of objective {name} cannot score texts; "
                         "give a reward-model run (objective.name: reward) or a classification run")
