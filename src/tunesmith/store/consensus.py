"""How many raters, agreeing how much, a verdict needs before it becomes training data.

An *item* is what raters can agree on: for a choice, a prompt and the two models compared (in
either order); for ``retrain``'s rated traffic, an input of the served run. Each rater's latest
verdict on an item counts, once. A verdict is *supported* when its item has at least
``min_raters`` raters and at least ``agreement`` of them gave it.

The export writes the choices whose verdict is supported (a tie is no pair); ``retrain`` trains on
an input's most common supported verdict (a tie between verdicts goes to the one given last).
The defaults (one rater, no agreement asked) support every verdict. ``tunesmith feedback export``,
the rate page's export and ``tunesmith retrain`` take ``--min-raters`` and ``--agreement``; each
item with no supported verdict is counted by its reason.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from tunesmith.errors import TunesmithError

TOO_FEW_RATERS = "too_few_raters"
RATERS_DISAGREE = "raters_disagree"


@dataclass(frozen=True)
class Support:
    """An item's supported verdicts, each with the share of its raters that gave it (most common
    first; between equals, the one given last first), its number of raters, and why nothing is
    supported (None when something is)."""

    shares: dict[Hashable, float]
    raters: int
    left_out: str | None

    @property
    def verdict(self) -> Hashable | None:
        """The item's one verdict: its most common supported one."""
        return next(iter(self.shares), None)


@dataclass(frozen=True)
class Consensus:
    min_raters: int = 1
    agreement: float = 0.0

    def __post_init__(self):
        problems = [f"--min-raters {self.min_raters}: expected 1 or more"] if self.min_raters < 1 else []
        if not 0 <= self.agreement <= 1:
            problems.append(f"--agreement {self.agreement}: expected a share between 0 and 1 (0.66: two in three)")
        if problems:
            raise TunesmithError(*problems)

    def support(self, by_rater: dict[str, Hashable]) -> Support:
        """What ``{rater: verdict}`` supports; the dict's order is the order the verdicts were given
        (as ``latest`` makes it)."""
        raters = len(by_rater)
        if raters < self.min_raters:
            return Support({}, raters, TOO_FEW_RATERS)
        counts = Counter(by_rater.values())
        last = {verdict: n for n, verdict in enumerate(by_rater.values())}
        ranked = sorted(counts, key=lambda v: (counts[v], last[v]), reverse=True)
        shares = {v: counts[v] / raters for v in ranked if counts[v] / raters >= self.agreement}
        return Support(shares, raters, None if shares else RATERS_DISAGREE)


def latest(verdicts: Iterable[tuple[Hashable, str, Hashable]]) -> dict[Hashable, dict[str, Hashable]]:
    """``{item: {rater: verdict}}`` from ``(item, rater, verdict)`` in the order given: each rater's
    latest verdict, the raters ordered by when they gave it."""
    out: dict[Hashable, dict[str, Hashable]] = defaultdict(dict)
    for item, rater, verdict in verdicts:
        out[item].pop(rater, None)  # moved to the end: the dict's order is the verdicts' order
        out[item][rater] = verdict
    return dict(out)
