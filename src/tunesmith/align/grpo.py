"""GRPO's maths as small functions on [answers, answer tokens] tensors, each checked against a slow
reference in tests/test_align_grpo.py.

GRPO (Shao et al., 2024) has no value head: an answer's advantage is its reward against the other
answers to the same prompt (its group), the same for every token of the answer. The loss is PPO's
clipped surrogate on these advantages. The variants people compare differ in three places:

- the advantage's scale: divided by the group's reward std (GRPO), or not (Dr. GRPO, Liu et al., 2025);
- how token losses add up to the loss (``reduce``): over all tokens of an update (DAPO, Yu et al.,
  2025, and TRL's default), each answer's mean then the mean over answers (GRPO), or the sum over a
  constant, answers x max_new_tokens (Dr. GRPO);
- the importance ratio: per token (GRPO), or one per answer, the exponent of its mean token
  log-ratio (GSPO, Zheng et al., 2025).

``mask`` marks an answer's real tokens (1) against padding after its end (0), as in ``align/ppo.py``.
"""

from __future__ import annotations

from typing import Literal

import torch

LossType = Literal["dapo", "grpo", "dr_grpo"]
Importance = Literal["token", "sequence"]


def group_advantages(rewards: torch.Tensor, group: int, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """Each reward minus the mean of its group (consecutive runs of ``group`` answers to one prompt),
    divided by the group's std (Bessel-corrected, as TRL) plus ``eps`` when ``scale``. A group whose
    answers all scored the same gets 0: it has nothing to teach."""
    grouped = rewards.view(-1, group)
    advantages = grouped - grouped.mean(1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(1, keepdim=True) + eps)
    return advantages.flatten()


def zero_std_share(rewards: torch.Tensor, group: int) -> float:
    """The share of groups whose answers all scored the same (no learning signal)."""
    grouped = rewards.view(-1, group)
    return float((grouped == grouped[:, :1]).all(1).float().mean())


def drop_truncated(mask: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
    """``mask`` with the answers that have no end-of-turn token (cut off by ``max_new_tokens``) left
    out: DAPO's overlong filtering. They still count in their group's mean and std."""
    return mask * ended.to(mask.dtype).unsqueeze(1)


def log_importance(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                   importance: Importance) -> torch.Tensor:
    """The log importance ratio: per token ``[B, T]``, or per answer ``[B, 1]``, the mean of its
    tokens' log-ratios (GSPO's ``log s_i``)."""
    log_ratio = logp - old_logp
    if importance == "token":
        return log_ratio
    return ((log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1)).unsqueeze(1)


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate of Schulman's note, ``exp(ref - logp) - (ref - logp) - 1``: never
    negative, unbiased for KL(policy || ref) on the policy's own tokens (GRPO's, TRL's)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def clipped_losses(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   importance: Importance, clip: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, ``-min(r A, clip(r, 1 - clip, 1 + clip_high) A)``, and where the clipped term won
    (``r`` below the range with ``A < 0``, or above it with ``A > 0``); both ``[B, T]``."""
    ratio = torch.exp(log_importance(logp, old_logp, mask, importance))
    a = advantages.unsqueeze(1)
    unclipped = ratio * a
    clipped = ratio.clamp(1 - clip, 1 + clip_high) * a
    losses = -torch.minimum(unclipped, clipped)
    was_clipped = ((ratio < 1 - clip) & (a < 0)) | ((ratio > 1 + clip_high) & (a > 0))
    return losses.expand_as(logp), was_clipped.expand_as(logp)


def reduce(losses: torch.Tensor, mask: torch.Tensor, loss_type: LossType, max_new_tokens: int) -> torch.Tensor:
    """The update's loss from its token losses: ``dapo`` the mean over its answers' tokens; ``grpo``
    each answer's token mean, then the mean over answers; ``dr_grpo`` the sum over tokens divided by
    answers x ``max_new_tokens``, a constant, so no answer's tokens weigh more for its length."""
    masked = losses * mask
    if loss_type == "dapo":
        return masked.sum() / mask.sum().clamp(min=1)
    if loss_type == "grpo":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).mean()
    return masked.sum() / (losses.shape[0] * max_new_tokens)


def loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
         loss_type: LossType, importance: Importance, clip: float, clip_high: float, max_new_tokens: int,
         beta: float = 0.0, ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """GRPO's loss on one update's answers, to minimise, and its figures: the share of answer tokens
    clipped, and with ``beta`` the mean per-token k3 KL to the reference, which is added to every
    token's loss times ``beta`` before ``reduce``."""
    losses, was_clipped = clipped_losses(logp, old_logp, advantages, mask, importance, clip, clip_high)
    figures = {"clip_frac": _masked_mean(was_clipped.float(), mask)}
    if beta:
        kl = k3(logp, ref_logp)
        losses = losses + beta * kl
        figures["kl_k3"] = _masked_mean(kl.detach(), mask)
    return reduce(losses, mask, loss_type, max_new_tokens), figures


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1))
