"""Canary exposure, after Carlini et al., *The Secret Sharer* (USENIX Security 2019).

The candidates of a canary are every secret its template can hold (the space R, of size
10**digits). Order them by log-perplexity under the model, the most likely first; the canary's
rank r gives its exposure, ``log2 |R| - log2 r``: 0 when the canary is the least likely secret,
``log2 |R|`` when it is the most likely one, and about ``log2 e = 1.44`` bits on average for a
secret the model never saw (the expected value of ``-log2 U`` for U uniform on (0, 1]).

Two ways to find the rank:

- **exact**, when the space is small enough to score every candidate (``|R| <= candidates``);
- **extrapolated** otherwise (section 4.3 of the paper): score a uniform sample of candidates, fit
  a distribution to their log-perplexities, and read the share of the space that is more likely
  than the canary off its CDF: exposure ``= -log2 F(canary)``. The paper fits a skew-normal; we
  fit a normal, by its mean and standard deviation. Log-perplexities of random digit strings are
  sums of one loss per digit, close to normal; the normal's tail decides high exposures, so read
  them as estimates, to compare canaries and runs rather than as exact ranks. Since the canary
  itself is in the space, an estimate is capped at ``log2 |R|``.

The other canaries of a run are left out of every canary's candidates: they are secrets the model
was trained on, not a sample of the space.
"""

from __future__ import annotations

import math
import random

import numpy as np

RANDOM_BASELINE = 1 / math.log(2)  # bits: the mean exposure of a secret the model never saw


def exposure_from_rank(rank: float, space: int) -> float:
    """``log2 |R| - log2 rank``: rank 1 of 1024 is 10 bits."""
    return math.log2(space) - math.log2(rank)


def ranks(canary_scores: np.ndarray, candidate_scores: np.ndarray) -> np.ndarray:
    """Rank of each canary among itself and the candidates: 1 + candidates strictly more likely
    (lower log-perplexity). Ties count in the canary's favour."""
    return 1 + np.searchsorted(np.sort(candidate_scores), canary_scores, side="left")


def exact_exposures(canary_scores: np.ndarray, candidate_scores: np.ndarray) -> np.ndarray:
    """Exposure of each canary when ``candidate_scores`` covers every other secret of the space."""
    space = len(candidate_scores) + 1
    return np.array([exposure_from_rank(r, space) for r in ranks(canary_scores, candidate_scores)])


def extrapolated_exposures(canary_scores: np.ndarray, sample_scores: np.ndarray, space: int) -> np.ndarray:
    """Exposure from a normal fitted to the log-perplexities of a uniform sample of the space."""
    mean, std = float(np.mean(sample_scores)), float(np.std(sample_scores, ddof=1))
    out = []
    for score in canary_scores:
        share = 0.5 * math.erfc(-(score - mean) / (std * math.sqrt(2))) if std > 0 else float(score >= mean)
        # The canary ranks at least first: its share of the space is at least 1 / |R|.
        out.append(-math.log2(max(share, 1 / space)))
    return np.array(out)


def candidate_secrets(canaries: list[int], digits: int, candidates: int, seed: int = 0) -> tuple[list[int], bool]:
    """The secrets to score against the canaries, and whether they are the whole space.

    The whole space less the canaries when it has at most ``candidates`` other secrets; else a
    uniform sample of ``candidates`` of them, drawn from ``seed``.
    """
    space, taken = 10**digits, set(canaries)
    if space - len(taken) <= candidates:
        return [s for s in range(space) if s not in taken], True
    rng = random.Random(seed)
    sample: list[int] = []
    seen = set(taken)
    while len(sample) < candidates:
        s = rng.randrange(space)
        if s not in seen:
            seen.add(s)
            sample.append(s)
    return sample, False
