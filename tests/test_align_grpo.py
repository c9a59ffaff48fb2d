"""GRPO's maths (align/grpo.py) against slow references written one answer and one token at a time:
group advantages, and the clipped loss for every loss_type and importance level, with and without
the KL term, in value and in gradient."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from tunesmith.align import grpo


def slow_advantages(rewards: list[float], group: int, scale: bool) -> list[float]:
    out = []
    for start in range(0, len(rewards), group):
        g = rewards[start:start + group]
        mean, std = statistics.mean(g), statistics.stdev(g)
        out += [(r - mean) / (std + 1e-4) if scale else r - mean for r in g]
    return out


@pytest.mark.parametrize("scale", [True, False], ids=["grpo_std", "dr_grpo_no_std"])
def test_group_advantages_match_a_slow_reference(scale):
    rewards = [1.0, 0.0, 0.5, 2.0, 3.0, 3.0, 3.0, 3.0, -1.0, 4.0, 0.0, 0.25]
    got = grpo.group_advantages(torch.tensor(rewards), 4, scale)
    assert got.tolist() == pytest.approx(slow_advantages(rewards, 4, scale), abs=1e-5)
    assert got[4:8].tolist() == [0.0] * 4  # a group that scored alike teaches nothing
    assert grpo.zero_std_share(torch.tensor(rewards), 4) == pytest.approx(1 / 3)


def slow_loss(logp, old, adv, mask, loss_type, importance, clip, clip_high, max_new_tokens, beta=0.0, ref=None):
    """The loss and the clipped share, one token at a time, in autograd-able scalars."""
    answers, width = logp.shape
    terms, clipped, kept = [], 0, 0
    for i in range(answers):
        idx = [t for t in range(width) if mask[i, t] > 0]
        if importance == "sequence":
            seq_ratio = torch.exp(sum((logp[i, t] - old[i, t] for t in idx), torch.tensor(0.0)) / max(len(idx), 1))
        row = []
        for t in idx:
            r = torch.exp(logp[i, t] - old[i, t]) if importance == "token" else seq_ratio
            a = adv[i]
            term = -torch.minimum(r * a, torch.clamp(r, 1 - clip, 1 + clip_high) * a)
            clipped += int(bool((r < 1 - clip and a < 0) or (r > 1 + clip_high and a > 0)))
            kept += 1
            if beta:
                d = ref[i, t] - logp[i, t]
                term = term + beta * (torch.exp(d) - d - 1)
            row.append(term)
        terms.append(row)
    if loss_type == "dapo":
        total = sum((t for row in terms for t in row), torch.tensor(0.0)) / max(kept, 1)
    elif loss_type == "grpo":
        total = sum((sum(row, torch.tensor(0.0)) / max(len(row), 1) for row in terms), torch.tensor(0.0)) / answers
    else:
        total = sum((t for row in terms for t in row), torch.tensor(0.0)) / (answers * max_new_tokens)
    return total, clipped / max(kept, 1)


def _batch(seed: int = 0):
    torch.manual_seed(seed)
    answers, width = 6, 5
    old = -torch.rand(answers, width) * 3
    # Ratios far enough from 1 that both sides of the clip range are reached.
    logp = (old + torch.randn(answers, width) * 0.4).requires_grad_()
    lengths = [5, 3, 1, 4, 2, 5]
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    mask[5] = 0  # an answer left out (mask_truncated)
    adv = torch.tensor([1.5, -0.7, 0.3, -2.0, 0.9, 1.1])
    ref = old + torch.randn(answers, width) * 0.3
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("importance", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["no_kl", "kl"])
def test_the_loss_and_its_gradient_match_a_slow_reference(loss_type, importance, beta):
    logp, old, adv, mask, ref = _batch()
    options = {"loss_type": loss_type, "importance": importance, "clip": 0.2, "clip_high": 0.28, "max_new_tokens": 8}
    got, figures = grpo.loss(logp, old, adv, mask, beta=beta, ref_logp=ref, **options)
    (grad,) = torch.autograd.grad(got, logp)
    want, clip_frac = slow_loss(logp, old, adv, mask, loss_type, importance, 0.2, 0.28, 8, beta, ref)
    (want_grad,) = torch.autograd.grad(want, logp)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)
    assert figures["clip_frac"] == pytest.approx(clip_frac)
    assert 0 < clip_frac < 1  # the batch reaches the clip range and stays inside it too
    assert grad[5].abs().sum() == 0 and grad[2, 1:].abs().sum() == 0  # nothing from left-out tokens
    if beta:
        kl = grpo.k3(logp.detach(), ref)
        assert figures["kl_k3"] == pytest.approx(float((kl * mask).sum() / mask.sum()), rel=1e-5)


def test_on_policy_the_gradient_is_the_advantage_weighted_score_function():
    """At the first update of a step the policy is the sampler (ratio 1): each token's gradient is
    -A / (the loss's normaliser), whatever the clip, in each normalisation."""
    logp, _, adv, mask, _ = _batch()
    old = logp.detach().clone()
    tokens = mask.sum()
    for loss_type, normaliser in (("dapo", lambda i: tokens), ("grpo", lambda i: 6 * mask[i].sum()),
                                  ("dr_grpo", lambda i: 6 * 8)):
        got, _ = grpo.loss(logp, old, adv, mask, loss_type=loss_type, importance="token", clip=0.2, clip_high=0.2,
                           max_new_tokens=8)
        (grad,) = torch.autograd.grad(got, logp)
        for i in range(5):
            want = -adv[i] / normaliser(i) * mask[i]
            torch.testing.assert_close(grad[i], want, rtol=1e-5, atol=1e-7)


def test_sequence_level_clips_the_answer_as_a_whole():
    """GSPO: one token's large ratio does not clip an answer whose mean log-ratio is inside the range;
    the token level clips that token alone."""
    old = torch.zeros(1, 4)
    logp = torch.tensor([[math.log(1.5), math.log(0.95), math.log(0.95), math.log(0.95)]])
    mask, adv = torch.ones(1, 4), torch.tensor([1.0])
    _, token = grpo.clipped_losses(logp, old, adv, mask, "token", 0.2, 0.2)
    _, sequence = grpo.clipped_losses(logp, old, adv, mask, "sequence", 0.2, 0.2)
    assert token.tolist() == [[True, False, False, False]] and not sequence.any()


def test_truncated_answers_leave_the_loss_and_k3_is_a_kl():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    ended = torch.tensor([True, False, True])
    assert grpo.drop_truncated(mask, ended).tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]
    logp, ref = torch.randn(50), torch.randn(50)
    assert (grpo.k3(logp, ref) >= 0).all() and grpo.k3(logp, logp).abs().max() == 0
