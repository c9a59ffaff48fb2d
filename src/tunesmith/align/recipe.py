"""The PPO recipe: set up, score the base model's answers, train, score the tuned model's, save, report.

Each PPO step samples answers to a few prompts from the policy (base + adapter), scores them with
the reward, takes their log-probabilities under the policy and under the reference (the adapter
disabled), turns score and KL into per-token rewards and GAE advantages, and runs a few epochs of
clipped PPO updates over minibatches of the answers. The run directory lives like a training run's
(``store.Run``): status, config, metrics.jsonl, checkpoints/last for ``--resume``, adapter/, report.md.
The loop, its checkpoints and stops, the held-out evaluation and the saving are ``align/loop.py``'s,
which GRPO shares; this module is PPO's own: the value head, its step and its report.

One process: PPO does not split its steps over several processes yet.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tunesmith.align import ppo
from tunesmith.align.loop import (
    Policy,
    base_evaluation,
    evaluate,
    finish_policy,
    run_recipe,
    run_steps,
)
from tunesmith.align.options import PPOConfig
from tunesmith.align.prompts import prompts_of_step
from tunesmith.align.report import PPO_CURVES, plot_curves, write_report
from tunesmith.align.rewards import RewardFn, load_reward
from tunesmith.align.rollout import (
    PolicyWithValue,
    Rollout,
    answer_logprobs,
    reference_logprobs,
)
from tunesmith.errors import TunesmithError
from tunesmith.methods import count_parameters
from tunesmith.stopping import StopRequest
from tunesmith.store import Run
from tunesmith.train.loop import make_optimizer, make_scheduler

VALUE_HEAD = "value_head.safetensors"


class Parts:
    """What a PPO run works with, built from its config: the actor (``loop.Policy``: prompts,
    tokenizer, the model with its adapter), the same model with a value head (``policy``), the reward."""

    def __init__(self, config: PPOConfig, reward: RewardFn | None):
        self.config = config
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if reward is None:
            if not config.ppo.reward:
                raise TunesmithError("ppo.reward: give the run directory of a classifier or reward model")
            reward = load_reward(config.ppo.reward, config.ppo.reward_label, self.device)
        self.reward = reward
        self.actor = Policy(config)
        self.policy = PolicyWithValue(self.actor.model).to(self.device).eval()

    def rollout(self, prompts: list[str], samples: int,
                record: bool = False) -> tuple[Rollout, list[str], list[str], torch.Tensor]:
        """Sampled answers to ``prompts`` and their scores: (rollout, prompt per answer, answers, scores)."""
        rollout, texts = self.actor.sample(prompts, samples, record=record)
        asked = [p for p in prompts for _ in range(samples)]
        return rollout, asked, texts, self.score(asked, texts)

    def score(self, prompts: list[str], answers: list[str]) -> torch.Tensor:
        return torch.tensor([float(s) for s in self.reward(prompts, answers)], device=self.device)

    def evaluate(self, adapter: bool = True) -> dict:
        return evaluate(self.actor, lambda prompts, answers, rows: (self.score(prompts, answers), {}), adapter)


def run_ppo(config: PPOConfig, resume: bool = False, reward: RewardFn | None = None,
            on_step: Callable[[int], None] | None = None) -> Path:
    """Train with PPO as ``config`` says; returns the path of report.md. ``reward`` replaces the
    reward run (tests give a Python function)."""
    return run_recipe(config, resume, lambda: Parts(config, reward),
                      lambda parts, run, stop: _run(parts, run, resume, on_step, stop))


class PPOSteps:
    """PPO's steps for ``loop.run_steps``: the step's prompts, ``ppo_step``, and the KL coefficient
    as the state a checkpoint keeps."""

    shown = ("reward", "kl", "policy_loss", "value_loss")

    def __init__(self, parts: Parts, optimizer, scheduler, kl):
        self.parts, self.optimizer, self.scheduler, self.kl = parts, optimizer, scheduler, kl

    def step(self, index: int) -> dict:
        cfg = self.parts.config
        prompts = prompts_of_step(self.parts.actor.train_prompts, index, cfg.ppo.prompts_per_step, cfg.train.seed)
        return ppo_step(self.parts, self.optimizer, self.scheduler, self.kl, prompts)

    def state(self) -> dict:
        return {"kl_coef": self.kl.value}

    def load_state(self, state: dict) -> None:
        self.kl.value = state["kl_coef"]


def _run(parts: Parts, run: Run, resume: bool, on_step, stop: StopRequest) -> Path:
    config = parts.config
    cfg, train = config.ppo, config.train
    base = base_evaluation(run, resume, lambda: parts.evaluate(adapter=False))
    answers = cfg.prompts_per_step * cfg.samples_per_prompt
    updates = cfg.ppo_epochs * math.ceil(answers / cfg.minibatch_size)
    optimizer = make_optimizer(parts.policy, train)
    scheduler = make_scheduler(optimizer, train, train.max_steps * updates)
    kl = ppo.AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target else ppo.FixedKL(cfg.kl_coef)
    trainable, total = count_parameters(parts.policy)
    print(f"method {config.method.name} + value head: {trainable:,} trainable parameters of {total:,}")
    steps, seconds = run_steps(run, parts.policy, optimizer, scheduler, PPOSteps(parts, optimizer, scheduler, kl),
                               train.max_steps, train.save_every, resume, stop, on_step)
    return finish(parts, run, base, steps, seconds, trainable, total)


def ppo_step(parts: Parts, optimizer, scheduler, kl, prompts: list[str]) -> dict:
    """One PPO step on ``prompts``: roll out, score, advantages, then ``ppo_epochs`` of minibatch
    updates. Returns the step's metrics."""
    cfg, policy = parts.config.ppo, parts.policy
    started = time.perf_counter()
    rollout, _, _, scores = parts.rollout(prompts, cfg.samples_per_prompt, record=True)
    mask = rollout.mask
    penalised = scores if cfg.missing_eos_penalty is None else ppo.missing_eos_penalty(
        scores, rollout.ended, cfg.missing_eos_penalty)
    with torch.no_grad():
        # "Old" log-probs and values as the policy computed them while sampling (sample(record=True)).
        old_logp, old_values = rollout.logprobs, policy.value_head(rollout.states).squeeze(-1)
        ref_logp = reference_logprobs(policy, rollout, cfg.temperature)
    rewards, token_kl = ppo.token_rewards(penalised, old_logp, ref_logp, mask, kl.value)
    advantages, returns = ppo.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    advantages = ppo.whiten(advantages, mask)

    n = len(scores)
    params = [p for p in policy.parameters() if p.requires_grad]
    figures = {"policy_loss": [], "value_loss": [], "clip_frac": [], "value_clip_frac": [], "approx_kl": []}
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, device=mask.device)
        for i in range(0, n, cfg.minibatch_size):
            rows = order[i:i + cfg.minibatch_size]
            logp, values = answer_logprobs(policy, rollout, cfg.temperature, rows)
            m = mask[rows]
            pl, clip_frac = ppo.policy_loss(logp, old_logp[rows], advantages[rows], m, cfg.clip)
            vl, value_clip_frac = ppo.value_loss(values, old_values[rows], returns[rows], m, cfg.value_clip)
            (pl + cfg.value_coef * vl).backward()
            if parts.config.train.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, parts.config.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            approx = ppo.masked_mean(0.5 * (logp - old_logp[rows]) ** 2, m).detach()
            for key, value in (("policy_loss", pl), ("value_loss", vl), ("clip_frac", clip_frac),
                               ("value_clip_frac", value_clip_frac), ("approx_kl", approx)):
                figures[key].append(value.item())
    mean_kl = float(token_kl.sum(1).mean())
    record = {
        "reward": float(scores.mean()),
        "reward_std": float(scores.std()) if n > 1 else 0.0,
        "kl": mean_kl,
        "kl_coef": kl.value,
        **{k: sum(v) / len(v) for k, v in figures.items()},
        "answer_len": float(mask.sum(1).mean()),
        "ended": float(rollout.ended.float().mean()),
        "lr": scheduler.get_last_lr()[0],
        "seconds": time.perf_counter() - started,
    }
    kl.update(mean_kl, n)
    return record


def finish(parts: Parts, run: Run, base: dict, steps: int, seconds: float, trainable: int, total: int) -> Path:
    """Score the tuned model's answers, save adapter and value head, write metrics.json and the report."""
    from safetensors.torch import save_file

    summary, tuned = finish_policy(run, parts.actor, parts.evaluate, base, ("mean_reward", "kl", "ended"), steps,
                                   seconds, trainable, total)
    save_file({k: v.contiguous() for k, v in parts.policy.value_head.state_dict().items()}, run.path / VALUE_HEAD)
    summary["reward_run"] = parts.config.ppo.reward
    has_plot = plot_curves(run.metrics_log, run.path / "curves.png", PPO_CURVES)
    run.save_json("metrics", summary)  # metrics.json and report.md last: their presence means the run finished
    return write_report(run.path, summary, base, tuned, has_plot)
