"""The promotion rule: a child replaces its parent only if it is better on the new data and not
worse on the original test set by more than a tolerance."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tunesmith.eval.metrics import METRICS


@dataclass(frozen=True)
class Decision:
    promote: bool
    metric: str
    higher_is_better: bool
    tolerance: float
    parent_original: float
    child_original: float
    parent_new: float
    child_new: float
    reason: str

    def record(self) -> dict:
        return asdict(self)


def decide(parent: dict[str, dict], child: dict[str, dict], metric: str, tolerance: float) -> Decision:
    """``parent`` and ``child``: metrics on ``"original"`` (the parent's test set) and ``"new"``
    (held-out rated traffic). ``metric``: a name in ``eval.metrics.METRICS``, which says which way is better."""
    higher = METRICS[metric].higher_is_better
    sign = 1 if higher else -1
    po, co = parent["original"][metric], child["original"][metric]
    pn, cn = parent["new"][metric], child["new"][metric]
    better_new = sign * (cn - pn) > 0
    kept_original = sign * (co - po) >= -tolerance
    if better_new and kept_original:
        reason = f"better on new data ({metric} {pn:.4f} -> {cn:.4f}), original within tolerance ({po:.4f} -> {co:.4f})"
    elif not better_new:
        reason = f"not better on new data ({metric} {pn:.4f} -> {cn:.4f})"
    else:
        reason = f"worse on the original test set by more than {tolerance} ({metric} {po:.4f} -> {co:.4f})"
    return Decision(better_new and kept_original, metric, higher, tolerance, po, co, pn, cn, reason)
