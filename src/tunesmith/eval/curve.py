"""Was the training long enough? Read from the validation losses the loop logged.

- over-fitted: the validation loss rose after its lowest point by more than ``TOLERANCE`` of it;
- under-trained: it fell over each of the last two intervals, the last fall more than ``STILL_FALLING``
  of the loss. How many more steps the curve suggests: the fall per step is taken to shrink
  geometrically, at the rate seen between the last two intervals, and the training to be long enough
  once what remains to gain is under ``STILL_FALLING`` of the loss. Where the fall is not slowing, as
  many steps again (a lower bound, said so).
"""

from __future__ import annotations

import math

TOLERANCE = 0.01  # a rise of 1% of the loss is more than validation noise on a few hundred examples
STILL_FALLING = 0.005  # a fall of 0.5% of the loss per interval still matters


def validations(records: list[dict]) -> list[tuple[int, float]]:
    """(step, validation loss) from metrics.jsonl's records, one per step (the last logged)."""
    by_step = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    return sorted(by_step.items())


def _round(n: float) -> int:
    """Two significant figures: the estimate is rough."""
    digits = max(0, len(str(int(n))) - 2)
    return int(round(n, -digits))


def training_length(curve: list[tuple[int, float]], best_kept: bool) -> dict | None:
    """``{"verdict": "under-trained" | "over-fitted", "line": ..., ...}``, or None when the curve says
    neither (or has fewer than three validations). ``best_kept``: the run ended with the best
    validation's weights (``train.keep_best``, the loop's ``TrainState.kept_step``)."""
    if len(curve) < 3:
        return None
    steps, losses = zip(*curve)
    best = min(range(len(losses)), key=losses.__getitem__)
    last_step, last = steps[-1], losses[-1]
    if best < len(losses) - 1 and last - losses[best] > TOLERANCE * abs(losses[best]):
        kept = (f"step {steps[best]}'s weights are kept, not the last step's" if best_kept else
                f"the last step's weights are kept, not step {steps[best]}'s (train.keep_best)")
        return {"verdict": "over-fitted", "best_step": steps[best], "best_val_loss": losses[best],
                "line": f"over-fitted: validation loss lowest at step {steps[best]} ({losses[best]:.4f}), "
                        f"{last:.4f} at the last step {last_step}; {kept}"}
    (s0, s1, s2), (v0, v1, v2) = steps[-3:], losses[-3:]
    if not (v0 > v1 > v2 and v1 - v2 > STILL_FALLING * abs(v2)):
        return None
    early, late = (v0 - v1) / (s1 - s0), (v1 - v2) / (s2 - s1)  # fall per step
    if late < early:
        decay = math.log(early / late) / ((s2 - s0) / 2)  # per step, between the intervals' middles
        # What remains to gain after n more steps is late / decay * exp(-decay * n).
        more = math.log(late / (decay * STILL_FALLING * abs(v2))) / decay
        if more < 1:
            return None
        more, bound = min(_round(more), 10 * last_step), "about"
    else:
        more, bound = _round(last_step), "at least"
    return {"verdict": "under-trained", "more_steps": more,
            "line": f"under-trained: the validation loss was still falling at the last step ({v1:.4f} at step "
                    f"{s1}, {v2:.4f} at step {s2}); the curve suggests {bound} {more} more steps "
                    f"(train.max_steps {last_step + more})"}
