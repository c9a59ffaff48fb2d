"""PPO's maths (align/ppo.py), each function against a slow per-element reference."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.align import ppo


def _batch(seed: int = 0, n: int = 4, t: int = 6):
    g = torch.Generator().manual_seed(seed)
    lengths = [t, 3, 1, 5][:n]
    mask = torch.tensor([[1.0 if j < length else 0.0 for j in range(t)] for length in lengths])
    return g, mask, lengths


def test_token_rewards_put_the_score_on_the_last_token_and_penalise_kl():
    g, mask, lengths = _batch()
    logp, ref = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    scores = torch.tensor([1.0, -2.0, 0.5, 3.0])
    rewards, kl = ppo.token_rewards(scores, logp, ref, mask, kl_coef=0.3)
    for i, length in enumerate(lengths):
        for j in range(6):
            want_kl = (logp[i, j] - ref[i, j]).item() if j < length else 0.0
            want = -0.3 * want_kl + (scores[i].item() if j == length - 1 else 0.0)
            assert kl[i, j].item() == pytest.approx(want_kl, abs=1e-6)
            assert rewards[i, j].item() == pytest.approx(want, abs=1e-6)


def _slow_gae(rewards, values, length, gamma, lam):
    advantages = [0.0] * length
    for t in range(length):
        total = 0.0
        for k in range(t, length):
            next_value = values[k + 1] if k + 1 < length else 0.0
            delta = rewards[k] + gamma * next_value - values[k]
            total += (gamma * lam) ** (k - t) * delta
        advantages[t] = total
    return advantages, [a + v for a, v in zip(advantages, values)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_the_sum_of_discounted_td_errors(gamma, lam):
    g, mask, lengths = _batch(1)
    rewards, values = torch.randn(4, 6, generator=g) * mask, torch.randn(4, 6, generator=g)
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    for i, length in enumerate(lengths):
        want_a, want_r = _slow_gae(rewards[i].tolist(), values[i].tolist(), length, gamma, lam)
        assert advantages[i, :length].tolist() == pytest.approx(want_a, abs=1e-5)
        assert returns[i, :length].tolist() == pytest.approx(want_r, abs=1e-5)
        assert advantages[i, length:].abs().sum() == 0 and returns[i, length:].abs().sum() == 0


def test_whiten_gives_zero_mean_unit_variance_over_the_masked_tokens():
    g, mask, _ = _batch(2)
    x = torch.randn(4, 6, generator=g) * 3 + 2
    kept = [x[i, j].item() for i in range(4) for j in range(6) if mask[i, j]]
    mean = sum(kept) / len(kept)
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / len(kept))
    out = ppo.whiten(x, mask)
    unshifted = ppo.whiten(x, mask, shift_mean=False)
    for i in range(4):
        for j in range(6):
            want = (x[i, j].item() - mean) / std if mask[i, j] else 0.0
            assert out[i, j].item() == pytest.approx(want, abs=1e-4)
            assert unshifted[i, j].item() == pytest.approx(want + mean if mask[i, j] else 0.0, abs=1e-4)


def test_policy_loss_is_the_clipped_surrogate():
    g, mask, _ = _batch(3)
    old = torch.randn(4, 6, generator=g)
    new = old + 0.5 * torch.randn(4, 6, generator=g)
    adv = torch.randn(4, 6, generator=g)
    loss, clipfrac = ppo.policy_loss(new, old, adv, mask, clip=0.2)
    terms, clipped = [], []
    for i in range(4):
        for j in range(6):
            if not mask[i, j]:
                continue
            r = math.exp(new[i, j].item() - old[i, j].item())
            a = adv[i, j].item()
            plain, capped = -a * r, -a * min(max(r, 0.8), 1.2)
            terms.append(max(plain, capped))
            clipped.append(capped > plain)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)
    assert clipfrac.item() == pytest.approx(sum(clipped) / len(clipped))
    assert 0 < clipfrac.item() < 1  # the data exercises both branches


def test_policy_loss_gradient_at_the_old_policy_is_the_policy_gradient():
    # With p = p_old the ratio is 1 and nothing is clipped: d loss / d logp = -A / tokens.
    _, mask, _ = _batch()
    logp = torch.zeros(4, 6, requires_grad=True)
    adv = torch.arange(24.0).view(4, 6)
    ppo.policy_loss(logp, logp.detach(), adv, mask, clip=0.2)[0].backward()
    assert torch.allclose(logp.grad, -adv * mask / mask.sum())


def test_value_loss_is_clipped_around_the_rollout_values():
    g, mask, _ = _batch(4)
    old = torch.randn(4, 6, generator=g)
    new = old + torch.randn(4, 6, generator=g)
    returns = torch.randn(4, 6, generator=g)
    loss, clipfrac = ppo.value_loss(new, old, returns, mask, clip=0.3)
    terms, clipped = [], []
    for i in range(4):
        for j in range(6):
            if not mask[i, j]:
                continue
            v, o, r = new[i, j].item(), old[i, j].item(), returns[i, j].item()
            vc = o + min(max(v - o, -0.3), 0.3)
            terms.append(0.5 * max((v - r) ** 2, (vc - r) ** 2))
            clipped.append((vc - r) ** 2 > (v - r) ** 2)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)
    assert clipfrac.item() == pytest.approx(sum(clipped) / len(clipped))


def test_missing_eos_penalty_lowers_only_cut_off_answers():
    scores = torch.tensor([1.0, 2.0, -1.0])
    out = ppo.missing_eos_penalty(scores, torch.tensor([True, False, False]), penalty=1.5)
    assert out.tolist() == [1.0, 0.5, -2.5]


def test_adaptive_kl_moves_the_coefficient_towards_the_target_and_fixed_stays():
    ctl = ppo.AdaptiveKL(value=0.2, target=6.0, horizon=10000)
    ctl.update(kl=12.0, n_answers=100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 100 / 10000))
    ctl = ppo.AdaptiveKL(value=0.2, target=6.0, horizon=10000)
    ctl.update(kl=5.4, n_answers=64)  # error -0.1, not clipped
    assert ctl.value == pytest.approx(0.2 * (1 - 0.1 * 64 / 10000))
    fixed = ppo.FixedKL(0.05)
    fixed.update(kl=100.0, n_answers=64)
    assert fixed.value == 0.05
