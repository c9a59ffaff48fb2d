"""Two-sample tests on embeddings: an MMD permutation test and a domain classifier's AUC.

Both ask whether two sets of vectors come from one distribution. The MMD (maximum mean
discrepancy, Gretton et al. 2012) with a Gaussian (RBF) kernel is zero only when they do; its
p-value comes from permutations of the pooled sample, so it needs no asymptotics. The domain
classifier (logistic regression told which set each vector came from, scored by cross-validated
ROC AUC) says how separable they are: 0.5 is chance; Evidently calls above 0.55 drift.
All in float64 torch, seeded, on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pairwise_sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return d.clamp_min(0)


def median_bandwidth(pooled: torch.Tensor) -> float:
    """The median heuristic: the median distance between distinct points of the pooled sample."""
    d = pairwise_sq_dists(pooled, pooled)
    i, j = torch.triu_indices(len(pooled), len(pooled), offset=1)
    median = d[i, j].sqrt().median().item()
    return median if median > 0 else 1.0


def rbf_kernel(pooled: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return torch.exp(-pairwise_sq_dists(pooled, pooled) / (2 * bandwidth**2))


def mmd2(kernel: torch.Tensor, first: torch.Tensor) -> float:
    """The biased (V-statistic) squared MMD between the rows marked ``first`` and the others,
    from the pooled sample's kernel matrix."""
    a, b = first.double(), (~first).double()
    a, b = a / a.sum(), b / b.sum()
    w = a - b
    return float(w @ kernel @ w)


@dataclass(frozen=True)
class MMDResult:
    mmd2: float
    p_value: float
    bandwidth: float
    null: list[float]  # the permutation statistics, for the report's plot


def mmd_test(x: torch.Tensor, y: torch.Tensor, permutations: int = 200, seed: int = 0) -> MMDResult:
    """Squared MMD of ``x`` and ``y`` (rows are samples) and its permutation p-value,
    ``(1 + #{permuted >= observed}) / (1 + permutations)``, which is never 0."""
    pooled = torch.cat([x, y]).double()
    bandwidth = median_bandwidth(pooled)
    kernel = rbf_kernel(pooled, bandwidth)
    first = torch.zeros(len(pooled), dtype=torch.bool)
    first[: len(x)] = True
    observed = mmd2(kernel, first)
    g = torch.Generator().manual_seed(seed)
    null = [mmd2(kernel, first[torch.randperm(len(pooled), generator=g)]) for _ in range(permutations)]
    exceed = sum(s >= observed for s in null)
    return MMDResult(observed, (1 + exceed) / (1 + permutations), bandwidth, null)


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U)."""
    scores, labels = scores.double(), labels.bool()
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    sorted_scores = scores[order]
    # Average ranks over ties, so that tied scores count half.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2
    ranks[order] = average[inverse]
    positives, negatives = int(labels.sum()), int((~labels).sum())
    u = ranks[labels].sum().item() - positives * (positives + 1) / 2
    return u / (positives * negatives)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1.0, steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression (sklearn's default, C=1): weights and bias, by L-BFGS."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    target = y.double()

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, target, reduction="sum")
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def domain_auc(x: torch.Tensor, y: torch.Tensor, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated ROC AUC of a logistic regression telling ``y``'s rows from ``x``'s: every
    row is scored by a model fitted without it (features standardised on the training folds)."""
    pooled = torch.cat([x, y]).double()
    labels = torch.cat([torch.zeros(len(x)), torch.ones(len(y))]).bool()
    g = torch.Generator().manual_seed(seed)
    # Stratified folds: each holds its share of both sets.
    fold = torch.empty(len(pooled), dtype=torch.long)
    for members in (torch.nonzero(~labels).flatten(), torch.nonzero(labels).flatten()):
        fold[members[torch.randperm(len(members), generator=g)]] = torch.arange(len(members)) % folds
    scores = torch.empty(len(pooled), dtype=torch.float64)
    with torch.enable_grad():
        for k in range(folds):
            train, held = fold != k, fold == k
            mean, std = pooled[train].mean(0), pooled[train].std(0).clamp_min(1e-8)
            w, b = fit_logistic((pooled[train] - mean) / std, labels[train])
            scores[held] = (pooled[held] - mean) / std @ w + b
    return roc_auc(scores, labels)
