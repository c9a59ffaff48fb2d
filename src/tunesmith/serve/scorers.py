"""Runs that score texts (a reward model, a classifier: their objective's ``Abilities.scores``),
served beside the adapters. Their heads are not the pool's causal LM, so each is loaded whole and on
its own, through ``score`` (the one place a run becomes a scorer, as for ``tunesmith score`` and PPO);
``/v1/models`` lists them and ``/v1/score`` asks them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.objectives import abilities, lacks
from tunesmith.score import Scorer, load_scorer
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
class ScorerPool:
    """The served scorers by name; one text batch scored at a time per pool."""

    scorers: dict[str, Scorer] = field(default_factory=dict)
    runs: dict[str, Path] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_runs(cls, runs: dict[str, Path], device: str | None = None) -> ScorerPool:
        scorers = {name: load_scorer(path, device=device) for name, path in runs.items()}
        return cls(scorers, {name: Path(path).resolve() for name, path in runs.items()})

    def models(self) -> list[dict]:
        """Their entries of ``/v1/models``: ``scores`` says what a score is (``reward``, ``P(label)``)."""
        return [{"id": name, "object": "model", "created": self.created, "owned_by": "tunesmith",
                 "root": str(self.runs[name]), "parent": None, "scores": scorer.what}
                for name, scorer in self.scorers.items()]

    def score(self, name: str, texts: list[str], prompt: str | None = None) -> list[float]:
        """The scores of ``texts``, read as answers to ``prompt`` (framed as the run was trained) if given."""
        scorer = self.scorers[name]
        if prompt is not None:
            texts = [scorer.frame(prompt, text) for text in texts]
        with self.lock:
            return scorer.score(texts)
