"""The decision rule of a classifier: which label to answer, given each label's probability.

``argmax`` answers the most probable label. On imbalanced labels that rarely finds the minority class
the user cares about, so the rule can be chosen on the validation split after training, to maximise
the metric the user names (``eval.decision_metric``):

- ``prior``: per-class prior correction, ``log p(c) - a * log prior(c)``, with the strength ``a``
  chosen on validation (``a = 1`` divides by the training prior; a class-balanced run may want less,
  or a negative ``a``);
- ``threshold``: with two labels, the threshold on the second label's probability; with more, one
  offset per label added to the log-probabilities, found by coordinate ascent.

Every rule is in the end one offset per label added to the log-probabilities before the argmax:
that is what a run records (``decision.json``) and what ``eval``, ``predict`` and the report apply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from tunesmith.eval.metrics import macro_f1

RULES = ("argmax", "prior", "threshold")
# What a rule may maximise: a metric of gold and predicted labels.
METRICS: dict[str, Callable[[list[str], list[str], list[str]], float]] = {
    "macro_f1": macro_f1,
    "accuracy": lambda gold, pred, labels: sum(g == p for g, p in zip(gold, pred)) / len(gold),
}
PRIOR_STRENGTHS = [round(-1 + 0.05 * i, 2) for i in range(51)]  # -1 .. 1.5
OFFSET_GRID = [round(-4 + 0.25 * i, 2) for i in range(33)]  # -4 .. 4, in log-probability
OFFSET_ROUNDS = 3
MAX_CUTS = 400  # thresholds tried on a large validation split: its probabilities' quantiles
_FLOOR = 1e-12  # a probability of 0 still has a finite log


@dataclass
class Decision:
    """A chosen rule: ``offsets[label]`` is added to that label's log-probability before the argmax."""

    rule: str
    metric: str
    offsets: dict[str, float]
    validation: dict[str, float]  # the metric on the validation split with argmax, and with this rule
    parameter: float | None = None  # prior: its strength; threshold with two labels: the threshold

    def choose(self, probabilities: np.ndarray, labels: list[str]) -> np.ndarray:
        """Each row's label index, for ``probabilities`` [rows, labels] in the order of ``labels``."""
        return _decide(_log(probabilities), np.array([self.offsets.get(label, 0.0) for label in labels]))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> Decision:
        return cls(**record)

    def describe(self) -> str:
        what = {"prior": "strength {:g}", "threshold": "threshold {:.4f}"}.get(self.rule)
        parameter = f" ({what.format(self.parameter)})" if what and self.parameter is not None else ""
        return (f"decision rule {self.rule}{parameter}, chosen on the validation split: "
                f"{self.metric} {self.validation['argmax']:.4f} with argmax, {self.validation[self.rule]:.4f} with it")


def _log(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(probabilities, dtype=np.float64), _FLOOR))


def _decide(log_p: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return (log_p + offsets).argmax(axis=1)


def fit_decision(rule: str, metric: str, probabilities: np.ndarray, gold: list[str], labels: list[str],
                 prior: dict[str, int]) -> Decision:
    """The rule whose parameters maximise ``metric`` on validation rows (``probabilities``, ``gold``);
    ``prior``: each label's count in the training split (for ``prior``). Of equal scores, the offsets
    closest to argmax win."""
    score = METRICS[metric]
    log_p = _log(probabilities)

    def value(offsets: np.ndarray) -> float:
        return score(gold, [labels[i] for i in _decide(log_p, offsets)], labels)

    zero = np.zeros(len(labels))
    best, parameter = zero, None
    if rule == "prior":
        counts = np.array([float(prior.get(label, 0)) for label in labels]) + 1.0
        log_prior = np.log(counts / counts.sum())
        best, parameter = _best([(-a * log_prior, a) for a in PRIOR_STRENGTHS], value)
    elif rule == "threshold" and len(labels) == 2:
        best, parameter = _best(_thresholds(log_p), value)
    elif rule == "threshold":
        best = _coordinate_ascent(value, len(labels))
    return Decision(rule, metric, {label: float(o) for label, o in zip(labels, best)},
                    {"argmax": value(zero), rule: value(best)}, parameter)


def _best(candidates: list[tuple[np.ndarray, float]], value) -> tuple[np.ndarray, float]:
    """The candidate of highest value; of equal values, the one of smallest offsets."""
    return max(candidates, key=lambda c: (value(c[0]), -float(np.abs(c[0]).sum())))


def _thresholds(log_p: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """Two labels: offsets that put the cut on the second label's probability between neighbouring
    validation probabilities (and at 0.5, argmax)."""
    p = np.sort(np.clip(np.exp(log_p[:, 1] - np.logaddexp(log_p[:, 0], log_p[:, 1])), 1e-6, 1 - 1e-6))
    cuts = (p[:-1] + p[1:]) / 2
    if len(cuts) > MAX_CUTS:
        cuts = np.quantile(cuts, np.linspace(0, 1, MAX_CUTS))
    # The second label is answered when log p1 + o > log p0, that is p1 > t for o = log((1 - t) / t).
    return [(np.array([0.0, np.log((1 - t) / t)]), float(t)) for t in sorted({0.5, *cuts.tolist()})]


def _coordinate_ascent(value, n: int) -> np.ndarray:
    offsets = np.zeros(n)
    for _ in range(OFFSET_ROUNDS):
        for c in range(n):
            trials = []
            for o in OFFSET_GRID:
                trial = offsets.copy()
                trial[c] = o
                trials.append((trial, o))
            offsets = _best(trials, value)[0]
    return offsets
