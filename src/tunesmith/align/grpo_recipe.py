"""The GRPO recipe (``tunesmith grpo``): set up, score the base model's answers, train, score the
tuned model's, save, report.

Each step samples ``samples_per_prompt`` answers (a group) to each of a few prompts from the policy
(base + adapter), the answers to one prompt sharing its KV cache, and keeps the log-probabilities the
sampler computed as the old ones. It scores the answers with the config's rewards, turns them into
group-normalised advantages, and runs ``num_iterations`` passes of clipped updates over minibatches
of the answers (``align/grpo.py``). There is no value head; with ``beta > 0`` the reference is the
policy with its adapter disabled.

The loop, checkpoints and ``--resume``, SIGTERM, the held-out evaluation and the saving are
``align/loop.py``'s, shared with PPO; the sampler is ``align/rollout.py``'s, the prompts
``align/prompts.py``'s, the rewards ``align/grpo_rewards.py``'s. One process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tunesmith.align import grpo
from tunesmith.align.grpo_rewards import Rewards, check_columns
from tunesmith.align.loop import (
    Policy,
    base_evaluation,
    evaluate,
    finish_policy,
    run_recipe,
    run_steps,
)
from tunesmith.align.options import GRPOConfig, GRPOOptions
from tunesmith.align.prompts import prompt_columns, prompts_of_step
from tunesmith.align.report import GRPO_CURVES, plot_curves, write_grpo_report
from tunesmith.align.rollout import causal_logprobs, reference_model_logprobs
from tunesmith.methods import count_parameters
from tunesmith.stopping import StopRequest
from tunesmith.store import Run
from tunesmith.train.loop import make_optimizer, make_scheduler


class Parts:
    """What a GRPO run works with: the policy (``loop.Policy``) and the rewards."""

    def __init__(self, config: GRPOConfig):
        self.config = config
        self.policy = Policy(config)
        cfg = config.grpo
        check_columns(cfg.rewards, prompt_columns(self.policy.train_rows[0]), cfg.prompts, "grpo.rewards")
        self.rewards = Rewards(cfg.rewards, self.policy.device)

    def evaluate(self, adapter: bool = True) -> dict:
        return evaluate(self.policy, self.rewards, adapter)


def run_grpo(config: GRPOConfig, resume: bool = False, on_step: Callable[[int], None] | None = None) -> Path:
    """Train with GRPO as ``config`` says; returns the path of report.md."""
    return run_recipe(config, resume, lambda: Parts(config),
                      lambda parts, run, stop: _run(parts, run, resume, on_step, stop))


class GRPOSteps:
    """GRPO's steps for ``loop.run_steps``: the step's prompts (with their rows) and ``grpo_step``.
    GRPO keeps no state of its own between steps."""

    shown = ("reward", "loss", "kl", "clip_frac")

    def __init__(self, parts: Parts, optimizer, scheduler):
        self.parts, self.optimizer, self.scheduler = parts, optimizer, scheduler
        policy = parts.policy
        self.prompts = list(zip(policy.train_prompts, policy.train_rows))

    def step(self, index: int) -> dict:
        cfg = self.parts.config
        chosen = prompts_of_step(self.prompts, index, cfg.grpo.prompts_per_step, cfg.train.seed)
        return grpo_step(self.parts, self.optimizer, self.scheduler, chosen)

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass


def _run(parts: Parts, run: Run, resume: bool, on_step, stop: StopRequest) -> Path:
    config = parts.config
    cfg, train = config.grpo, config.train
    base = base_evaluation(run, resume, lambda: parts.evaluate(adapter=False))
    optimizer = make_optimizer(parts.policy.model, train)
    scheduler = make_scheduler(optimizer, train, train.max_steps * updates_per_step(cfg))
    trainable, total = count_parameters(parts.policy.model)
    print(f"method {config.method.name}: {trainable:,} trainable parameters of {total:,}")
    steps, seconds = run_steps(run, parts.policy.model, optimizer, scheduler, GRPOSteps(parts, optimizer, scheduler),
                               train.max_steps, train.save_every, resume, stop, on_step)
    return finish(parts, run, base, steps, seconds, trainable, total)


def updates_per_step(cfg: GRPOOptions) -> int:
    """Optimizer updates in one step: ``num_iterations`` passes over its answers in minibatches."""
    answers = cfg.prompts_per_step * cfg.samples_per_prompt
    return cfg.num_iterations * math.ceil(answers / (cfg.minibatch_size or answers))


def grpo_step(parts: Parts, optimizer, scheduler, chosen: list[tuple[str, dict]]) -> dict:
    """One GRPO step on ``chosen`` (prompt, row) pairs: sample the groups, score them, advantages,
    then ``num_iterations`` passes of minibatch updates. Returns the step's metrics."""
    cfg, policy = parts.config.grpo, parts.policy
    started = time.perf_counter()
    group = cfg.samples_per_prompt
    prompts = [p for p, _ in chosen]
    rollout, texts = policy.sample(prompts, group, record=True, record_states=False)
    asked = [p for p in prompts for _ in range(group)]
    rows = [r for _, r in chosen for _ in range(group)]
    rewards, by_name = parts.rewards(asked, texts, rows)
    rewards = rewards.to(policy.device)
    advantages = grpo.group_advantages(rewards, group, cfg.scale_rewards)
    mask = grpo.drop_truncated(rollout.mask, rollout.ended) if cfg.mask_truncated else rollout.mask
    old_logp = rollout.logprobs  # as the policy computed them while sampling (sample(record=True))
    ref_logp = reference_model_logprobs(policy.model, rollout, cfg.temperature) if cfg.beta else None

    n, size = len(texts), cfg.minibatch_size or len(texts)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    figures: dict[str, list[float]] = {"loss": [], "clip_frac": []}
    for _ in range(cfg.num_iterations):
        order = torch.randperm(n, device=mask.device)
        for i in range(0, n, size):
            batch = order[i:i + size]
            logp = causal_logprobs(policy.model, rollout, cfg.temperature, batch)
            loss, figs = grpo.loss(logp, old_logp[batch], advantages[batch], mask[batch], loss_type=cfg.loss_type,
                                   importance=cfg.importance, clip=cfg.clip, clip_high=cfg.clip_high or cfg.clip,
                                   max_new_tokens=cfg.max_new_tokens, beta=cfg.beta,
                                   ref_logp=None if ref_logp is None else ref_logp[batch])
            loss.backward()
            if parts.config.train.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, parts.config.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            figures["loss"].append(loss.item())
            for key, value in figs.items():
                figures.setdefault(key, []).append(value)
    record = {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        **{f"reward_{name}": sum(s) / len(s) for name, s in by_name.items()},
        "zero_std": grpo.zero_std_share(rewards, group),
        **{k: sum(v) / len(v) for k, v in figures.items()},
    }
    if ref_logp is not None:  # nats per answer, as PPO and the report measure it
        record["kl"] = float(((old_logp - ref_logp) * rollout.mask).sum(1).mean())
    record |= {
        "answer_len": float(rollout.mask.sum(1).mean()),
        "ended": float(rollout.ended.float().mean()),
        "lr": scheduler.get_last_lr()[0],
        "seconds": time.perf_counter() - started,
    }
    return record


def finish(parts: Parts, run: Run, base: dict, steps: int, seconds: float, trainable: int, total: int) -> Path:
    """Score the tuned model's answers, save the adapter, write metrics.json and the report."""
    kept = ("mean_reward", "reward_means", "kl", "ended")
    summary, tuned = finish_policy(run, parts.policy, parts.evaluate, base, kept, steps, seconds, trainable, total)
    cfg = parts.config.grpo
    summary |= {"rewards": parts.rewards.names, "loss_type": cfg.loss_type, "importance": cfg.importance,
                "group": cfg.samples_per_prompt}
    has_plot = plot_curves(run.metrics_log, run.path / "curves.png", GRPO_CURVES)
    run.save_json("metrics", summary)  # metrics.json and report.md last: their presence means the run finished
    return write_grpo_report(run.path, summary, base, tuned, has_plot)
