"""The promotion rule: a child replaces its parent only if it is better on the new data and not
worse on the original test set by more than a tolerance. "Better on the new data" is the objective's
own metric on the held-out new rows, or, with a judge (``retrain --judge``), the judge's mean reward
of parent's and child's sampled answers to the held-out new prompts (``JUDGED``). A child with no
parent of its kind to beat (a first reward model, trained on a served run's rated answers) is
promoted only if its pairwise accuracy on the held-out new pairs beats chance."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tunesmith.eval.metrics import METRICS


@dataclass(frozen=True)
class Decision:
    promote: bool
    metric: str
    higher_is_better: bool
    tolerance: float
    parent_original: float | None  # None: not compared on the original test set
    child_original: float | None
    parent_new: float  # what the child had to beat on the new rows: its parent's figure, or chance
    child_new: float
    reason: str
    against: str = "parent"  # or "chance"
    new_metric: str | None = None  # what was compared on the new rows, where not ``metric`` (``JUDGED``)

    def record(self) -> dict:
        return asdict(self)


# The judge's mean reward of a model's sampled answers to the held-out new prompts: higher is better.
# Not a metric of ``eval.metrics.METRICS``: no objective's evaluation returns it, only the gate's judge.
JUDGED = "judged_mean_reward"


def _sign(metric: str) -> int:
    return 1 if metric == JUDGED or METRICS[metric].higher_is_better else -1


def decide(parent: dict[str, dict], child: dict[str, dict], metric: str, tolerance: float,
           new_metric: str | None = None) -> Decision:
    """``parent`` and ``child``: metrics on ``"original"`` (the parent's test set) and ``"new"``
    (held-out rated traffic). ``metric``: a name in ``eval.metrics.METRICS``, which says which way is
    better; ``new_metric``: what the new rows are compared on, where not ``metric`` (``JUDGED``)."""
    compared = new_metric or metric
    po, co = parent["original"][metric], child["original"][metric]
    pn, cn = parent["new"][compared], child["new"][compared]
    better_new = _sign(compared) * (cn - pn) > 0
    kept_original = _sign(metric) * (co - po) >= -tolerance
    if better_new and kept_original:
        reason = (f"better on new data ({compared} {pn:.4f} -> {cn:.4f}), original within tolerance "
                  f"({metric} {po:.4f} -> {co:.4f})")
    elif not better_new:
        reason = f"not better on new data ({compared} {pn:.4f} -> {cn:.4f})"
    else:
        reason = f"worse on the original test set by more than {tolerance} ({metric} {po:.4f} -> {co:.4f})"
    return Decision(better_new and kept_original, metric, _sign(metric) > 0, tolerance, po, co, pn, cn, reason,
                    new_metric=new_metric)


# A pair ranked at random is ranked right half the time.
PAIRWISE_CHANCE = 0.5


def decide_first(child: dict[str, dict], metric: str = "accuracy", chance: float = PAIRWISE_CHANCE) -> Decision:
    """A child with no parent of its kind (a reward model of a served run's answers, which starts from
    the base): promoted when its ``metric`` on the held-out new rows (``child["new"]``), pairwise
    accuracy, beats ``chance``. Its figure on the original test set, where there is one, is recorded,
    not gated: no earlier reward model scored it."""
    cn = child["new"][metric]
    co = child.get("original", {}).get(metric)
    promote = cn > chance
    reason = (f"{'better' if promote else 'not better'} than chance on new data ({metric} {chance:.4f} -> {cn:.4f}); "
              "no parent reward model to compare with")
    return Decision(promote, metric, METRICS[metric].higher_is_better, 0.0, None, co, chance, cn, reason, "chance")
