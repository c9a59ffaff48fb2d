"""Runs that score texts (a reward model, a classifier: their objective's ``Abilities.scores``),
served beside the adapters. Their heads are not the pool's causal LM, so each is loaded whole and on
its own, through ``score`` (the one place a run becomes a scorer, as for ``tunesmith score`` and PPO);
``/v1/models`` lists them and ``/v1/score`` asks them. A run that scores labels answers as
``tunesmith predict`` does (its ``Predictor``, on the same loaded model): each label's probability
and the label its decision rule chooses.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.data.clean import normalize_text
from tunesmith.errors import TunesmithError
from tunesmith.objectives import abilities, lacks
from tunesmith.predict import Predictor, Row
from tunesmith.score import Reader, Scorer, default_label, open_scorer, scoring_run
from tunesmith.store import Run


def split_runs(runs: dict[str, Path]) -> tuple[dict[str, Path], dict[str, Path]]:
    """The runs served as adapters of the shared base (they write a causal LM's answers) and those
    served as scorers; one line for a run that does neither."""
    adapters, scorers, problems = {}, {}, []
    for name, path in runs.items():
        if not (Path(path) / "config.yaml").is_file():
            problems.append(f"{path}: not a tunesmith run directory (no config.yaml)")
            continue
        objective = Run(path, writer=False).load_config().objective.name
        if abilities(objective).causal_answers:
            adapters[name] = path
        elif abilities(objective).scores:
            scorers[name] = path
        else:
            problems.append(f"{path}: served runs write a causal LM's answers or score texts; "
                            f"{lacks(objective, 'causal_answers')}, and it scores none")
    if problems:
        raise TunesmithError(*problems)
    return adapters, scorers


@dataclass
class Classifier:
    """A served run that scores labels, answering as ``tunesmith predict`` does for the same text."""

    predictor: Predictor
    scored: str  # the label whose probability is the score (``score.default_label``)

    @property
    def rule(self) -> str:
        """The decision rule that chooses the label (``decision.json``), or ``argmax``."""
        return self.predictor.decision.rule if self.predictor.decision else "argmax"

    def classify(self, texts: list[str]) -> list[dict]:
        """Each text's score, each label's probability and the label the run's decision rule chooses."""
        # Normalised as predict normalises the rows it reads.
        rows = [Row(i, normalize_text(text) or text) for i, text in enumerate(texts)]
        labels = self.predictor.labels
        answers = []
        for record in self.predictor.predict(rows):
            probabilities = {label: record[f"p_{label}"] for label in labels}
            answers.append({"score": probabilities[self.scored], "label": record["prediction"],
                            "probabilities": probabilities})
        return answers


def open_classifier(run: Run, reader: Reader, device: str | None = None) -> tuple[Scorer, Classifier]:
    """A labelled run's scorer (``score.scoring_run``'s) and its classifier, on one loaded model."""
    predictor = Predictor(run.path)
    if device is not None:
        predictor.model.to(device)
    label = default_label(predictor.labels)
    return reader.build(run, predictor.session, predictor.model, label, 16), Classifier(predictor, label)


@dataclass
class ScorerPool:
    """The served scorers by name; one text batch scored at a time per pool."""

    scorers: dict[str, Scorer] = field(default_factory=dict)
    runs: dict[str, Path] = field(default_factory=dict)
    classifiers: dict[str, Classifier] = field(default_factory=dict)  # those of ``scorers`` that score labels
    created: int = field(default_factory=lambda: int(time.time()))
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_runs(cls, runs: dict[str, Path], device: str | None = None) -> ScorerPool:
        scorers, classifiers = {}, {}
        for name, path in runs.items():
            run, reader = scoring_run(path)
            if reader.labelled:
                scorers[name], classifiers[name] = open_classifier(run, reader, device)
            else:
                scorers[name] = open_scorer(run, reader, None, device=device)
        return cls(scorers, {name: Path(path).resolve() for name, path in runs.items()}, classifiers)

    def models(self) -> list[dict]:
        """Their entries of ``/v1/models``: ``scores`` says what a score is (``reward``, ``P(label)``)."""
        return [{"id": name, "object": "model", "created": self.created, "owned_by": "tunesmith",
                 "root": str(self.runs[name]), "parent": None, "scores": scorer.what}
                for name, scorer in self.scorers.items()]

    def score(self, name: str, texts: list[str], prompt: str | None = None) -> list[dict]:
        """Each of ``texts``' ``score``, read as an answer to ``prompt`` (framed as the run was trained)
        if given; for a classifier also each label's ``probabilities`` and the ``label`` it chooses."""
        scorer = self.scorers[name]
        if prompt is not None:
            texts = [scorer.frame(prompt, text) for text in texts]
        with self.lock:
            if name in self.classifiers:
                return self.classifiers[name].classify(texts)
            return [{"score": s} for s in scorer.score(texts)]
