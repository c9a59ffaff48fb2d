"""PPO's maths as small functions on [batch, answer tokens] tensors, each checked against a slow
reference in tests/test_align_ppo.py.

``mask`` marks an answer's real tokens (1) against padding after its end (0). Everything here is
per token, as in Ziegler et al. (2019) and TRL's PPOTrainer: the reward is the reward model's score
at the answer's last token minus a KL penalty at every token, and returns and advantages come from
generalised advantage estimation (GAE) over the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``x`` scaled to unit variance over the masked tokens; centred too with ``shift_mean``.

    Advantages are whitened so that one learning rate suits rewards of any scale; returns are not,
    since the value head must learn them as they are.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards and per-token KL: ``-kl_coef * (log p - log p_ref)`` at every answer token,
    plus the answer's score at its last token.

    The KL estimate is the sampled log-ratio (k1 of Schulman's note), unbiased for KL(policy || ref)
    since the answers were sampled from the policy.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016): ``(advantages, returns)``.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}``, with V and A
    zero after an answer's last token; the returns ``A + V`` are the value head's targets.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al., 2017), to minimise: ``(loss, clip fraction)``.

    ``max(-A r, -A clip(r, 1 - clip, 1 + clip))`` with ``r = p / p_old``, averaged over answer
    tokens; the clip fraction is the share of tokens where the clipped term won.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: ``0.5 max((V - R)^2, (V_clipped - R)^2)`` with V kept within ``clip`` of
    the rollout's value, so one batch cannot move the value head far; ``(loss, clip fraction)``."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def missing_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """``scores`` lowered by ``penalty`` where an answer ran out of tokens before its end-of-turn token:
    without it, the policy learns that a cut-off answer is never judged on how it ends."""
    return scores - penalty * (~ended).to(scores.dtype)


class FixedKL:
    """A constant KL coefficient."""

    def __init__(self, value: float):
        self.value = value

    def update(self, kl: float, n_answers: int) -> None:
        pass


@dataclass
class AdaptiveKL:
    """The adaptive KL coefficient of Ziegler et al. (2019): after each batch of ``n_answers``,
    ``value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_answers / horizon``, steering the mean KL
    per answer towards ``target``."""

    value: float
    target: float
    horizon: float

    def update(self, kl: float, n_answers: int) -> None:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_answers / self.horizon
