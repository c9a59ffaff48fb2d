"""Preference losses, one small function each (as torchtune's ``rlhf/loss/dpo.py`` writes them).

Each takes the summed log-probabilities of the chosen and rejected answers under the policy and
under the reference, every tensor [pairs], and returns the loss of every pair, [pairs]. With
``h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)``, the log-ratio
by which the policy prefers the chosen answer more than the reference did:

- ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log sigmoid(beta h)``;
- ``conservative`` (cDPO): DPO with the labels smoothed by ``label_smoothing``, for pairs that are
  wrong that often: ``-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)``;
- ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 beta))^2``, which stops pushing once ``h`` reaches its
  target instead of driving it to infinity;
- ``hinge`` (SLiC, Zhao et al. 2023): ``max(0, 1 - beta h)``.

Reference-free losses (``REFERENCE_FREE``) need no reference model, so a step is one forward pass
instead of two. They take each answer's summed log-probability under the policy and its token
count, and work on the per-token mean ``a = logp / tokens`` (a longer answer is not penalised
for its length alone):

- ``simpo`` (Meng et al. 2024): ``-log sigmoid(beta (a_chosen - a_rejected) - gamma)``, a margin of
  ``gamma`` between the length-normalised rewards;
- ``orpo`` (Hong et al. 2024): the chosen answer's mean negative log-likelihood (the SFT loss) plus
  ``beta`` times the odds-ratio term ``-log sigmoid(log odds(chosen) - log odds(rejected))``, with
  ``odds(y) = p / (1 - p)`` and ``p = exp(a)``.

KTO (Ethayarajh et al. 2024) needs no pairs: each answer is marked good (desirable) or bad, and is
scored against a reference point ``z``, an estimate of KL(policy || reference) (``kto_reference_point``):

- ``kto``: with ``r = policy - reference``, the answer's log-ratio, a good answer's loss is
  ``desirable_weight (1 - sigmoid(beta (r - z)))`` and a bad one's ``undesirable_weight (1 - sigmoid(beta (z - r)))``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Loss = Callable[..., torch.Tensor]


def log_ratio(policy_chosen, policy_rejected, reference_chosen, reference_rejected) -> torch.Tensor:
    """``h``: how much more than the reference the policy prefers the chosen answer."""
    return (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)


def sigmoid_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    return -F.logsigmoid(beta * log_ratio(policy_chosen, policy_rejected, reference_chosen, reference_rejected))


def conservative_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    h = beta * log_ratio(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def ipo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    h = log_ratio(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    return torch.relu(1 - beta * log_ratio(policy_chosen, policy_rejected, reference_chosen, reference_rejected))


LOSSES: dict[str, Loss] = {
    "sigmoid": sigmoid_loss,
    "conservative": conservative_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
}


def simpo_loss(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, beta: float,
               gamma: float = 0.5) -> torch.Tensor:
    margin = policy_chosen / chosen_tokens - policy_rejected / rejected_tokens
    return -F.logsigmoid(beta * margin - gamma)


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` of ``p = exp(mean_logp)``, stable for ``p`` near 0 and 1."""
    return mean_logp - torch.log1p(-torch.exp(mean_logp).clamp(max=1 - 1e-7))


def orpo_loss(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, beta: float,
              gamma: float = 0.0) -> torch.Tensor:
    chosen, rejected = policy_chosen / chosen_tokens, policy_rejected / rejected_tokens
    return -chosen - beta * F.logsigmoid(log_odds(chosen) - log_odds(rejected))


REFERENCE_FREE: dict[str, Loss] = {
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}


def kto_reference_point(policy_mismatched: torch.Tensor, reference_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's ``z``: the mean log-ratio of policy to reference over mismatched (prompt, another answer's
    completion) pairs, an estimate of KL(policy || reference); detached (no gradient flows through the
    reference point) and clamped at 0, since a KL is never negative."""
    return (policy_mismatched - reference_mismatched).mean().detach().clamp(min=0)


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, reference_point: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Each answer's KTO loss, [answers]: ``policy`` and ``reference`` its summed log-probabilities,
    ``desirable`` whether it is marked good, ``reference_point`` from ``kto_reference_point``."""
    r = policy - reference
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - reference_point)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (reference_point - r)))
    return torch.where(desirable, good, bad)
