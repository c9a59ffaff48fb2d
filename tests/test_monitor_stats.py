"""The drift tests' maths against slow references and known distributions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tunesmith.monitor.stats import domain_auc, fit_logistic, median_bandwidth, mmd2, mmd_test, rbf_kernel, roc_auc


def _normal(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def test_mmd2_matches_the_definition():
    x, y = _normal(7, 3, 0), _normal(5, 3, 1, 0.5)
    pooled = torch.cat([x, y])
    h = median_bandwidth(pooled)
    distances = sorted(math.dist(a.tolist(), b.tolist()) for a, b in itertools.combinations(pooled, 2))
    assert h == pytest.approx(torch.tensor(distances).median().item())

    def k(a, b):
        return math.exp(-math.dist(a.tolist(), b.tolist()) ** 2 / (2 * h * h))

    slow = (sum(k(a, b) for a in x for b in x) / 49 + sum(k(a, b) for a in y for b in y) / 25
            - 2 * sum(k(a, b) for a in x for b in y) / 35)
    first = torch.tensor([True] * 7 + [False] * 5)
    assert mmd2(rbf_kernel(pooled, h), first) == pytest.approx(slow, rel=1e-9)


def test_mmd_finds_no_drift_in_one_distribution_and_drift_in_a_shifted_one():
    same = mmd_test(_normal(60, 8, 0), _normal(60, 8, 1), permutations=200)
    shifted = mmd_test(_normal(60, 8, 0), _normal(60, 8, 1, shift=0.5), permutations=200)
    assert same.p_value > 0.05
    assert shifted.p_value < 0.01 and shifted.p_value == 1 / 201  # no permutation reached it
    assert len(same.null) == 200 and shifted.mmd2 > max(shifted.null)


def test_mmd_p_values_are_uniform_under_no_drift():
    # Under the null the permutation p-value is (close to) uniform: about 5% of tests fall below 0.05.
    p = [mmd_test(_normal(20, 2, 2 * i), _normal(20, 2, 2 * i + 1), permutations=100, seed=i).p_value
         for i in range(40)]
    assert sum(v < 0.05 for v in p) <= 6
    assert 0.3 < sum(p) / len(p) < 0.7


def test_roc_auc_matches_counting_pairs_with_ties():
    scores = torch.tensor([0.1, 0.4, 0.4, 0.8, 0.3, 0.4, 0.9, 0.2])
    labels = torch.tensor([0, 0, 1, 1, 0, 1, 1, 0]).bool()
    pos, neg = scores[labels], scores[~labels]
    slow = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))
    assert roc_auc(scores, labels) == pytest.approx(slow)
    assert roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([False, True])) == 1.0


def test_domain_classifier_is_at_chance_on_one_distribution_and_separates_shifted_ones():
    assert domain_auc(_normal(100, 16, 0), _normal(100, 16, 1)) < 0.6
    # The best possible AUC here is Phi(0.5 * sqrt(16) / sqrt(2)) = 0.92.
    assert domain_auc(_normal(100, 16, 0), _normal(100, 16, 1, shift=0.5)) > 0.85


def test_logistic_regression_reaches_the_optimum():
    # At the minimum of the penalised log-loss its gradient is zero: X^T (p - y) + l2 w = 0, sum(p - y) = 0.
    x = _normal(80, 5, 3)
    y = (x[:, 0] + 0.5 * _normal(80, 1, 4)[:, 0] > 0)
    w, b = fit_logistic(x, y, l2=1.0)
    residual = torch.sigmoid(x @ w + b) - y.double()
    assert torch.allclose(x.T @ residual + w, torch.zeros(5, dtype=torch.float64), atol=1e-4)
    assert abs(residual.sum().item()) < 1e-4
