"""The PPO recipe: set up, score the base model's answers, train, score the tuned model's, save, report.

Each PPO step samples answers to a few prompts from the policy (base + adapter), scores them with
the reward, takes their log-probabilities under the policy and under the reference (the adapter
disabled), turns score and KL into per-token rewards and GAE advantages, and runs a few epochs of
clipped PPO updates over minibatches of the answers. The run directory lives like a training run's
(``store.Run``): status, config, metrics.jsonl, checkpoints/last for ``--resume``, adapter/, report.md.

One process: PPO does not split its steps over several processes yet.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tunesmith.align import ppo
from tunesmith.align.options import PPOConfig, load_ppo_config
from tunesmith.align.prompts import framed, framing, load_prompts, prompts_of_step
from tunesmith.align.report import plot_curves, write_report
from tunesmith.align.rewards import RewardFn, load_reward
from tunesmith.align.rollout import (
    PolicyWithValue,
    Rollout,
    answer_logprobs,
    answer_texts,
    reference_logprobs,
    sample,
)
from tunesmith.errors import TunesmithError
from tunesmith.export.portable import make_portable
from tunesmith.methods import count_parameters, get_method
from tunesmith.model import lay_out_for_decoding, load_model, model_origin, resolve_model
from tunesmith.objectives.causal import greedy_answer
from tunesmith.recipe import setup_threads
from tunesmith.stopping import Interrupted, StopRequest, UpdateHold, on_sigterm
from tunesmith.store import Run
from tunesmith.train import distributed
from tunesmith.train.checkpoint import load_checkpoint, save_checkpoint
from tunesmith.train.loop import keep_metrics_until, make_optimizer, make_scheduler

VALUE_HEAD = "value_head.safetensors"


class Parts:
    """What a PPO run works with, built from its config: tokenizer, policy with value head, reward."""

    def __init__(self, config: PPOConfig, reward: RewardFn | None):
        self.config = config
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if reward is None:
            if not config.ppo.reward:
                raise TunesmithError("ppo.reward: give the run directory of a classifier or reward model")
            reward = load_reward(config.ppo.reward, config.ppo.reward_label, self.device)
        self.reward = reward
        self.train_prompts, self.eval_prompts = load_prompts(config.ppo, config.train.seed)
        self.method = get_method(config.method.name)
        self.tokenizer, self.encoder, model = base_parts(config)
        model = self.method.apply(model, config.method)
        if not hasattr(model, "disable_adapter"):
            raise TunesmithError(f"method.name: PPO needs a method whose adapter can be disabled (the reference "
                                 f"model), such as lora; {config.method.name} has none")
        self.policy = PolicyWithValue(model).to(self.device)
        lay_out_for_decoding(self.policy)  # the frozen base: sampling 16 answers at once runs faster on CPU
        self.policy.eval()  # no dropout: the log-probs of the rollout and of the update must agree

    def encode(self, prompts: list[str]) -> list[list[int]]:
        return [self.tokenizer(framed(self.encoder, p), add_special_tokens=False).input_ids for p in prompts]

    def rollout(self, prompts: list[str], samples: int,
                record: bool = False) -> tuple[Rollout, list[str], list[str], torch.Tensor]:
        """Sampled answers to ``prompts`` and their scores: (rollout, prompt per answer, answers, scores)."""
        cfg = self.config.ppo
        rollout = sample(self.policy.model, self.tokenizer, self.encode(prompts), samples, cfg.max_new_tokens,
                         cfg.temperature, cfg.top_k, self.device, record=record)
        texts = answer_texts(self.tokenizer, rollout)
        asked = [p for p in prompts for _ in range(samples)]
        scores = torch.tensor([float(s) for s in self.reward(asked, texts)], device=self.device)
        return rollout, asked, texts, scores


def base_parts(config: PPOConfig):
    """``(tokenizer, encoder, base model)``: the policy's base, and the framing of its prompts
    (``prompts.framing``)."""
    tokenizer, encoder = framing(config)
    model = load_model(resolve_model(config.model.name), "AutoModelForCausalLM", config.model.dtype,
                       **get_method(config.method.name).load_kwargs(config.method))
    return tokenizer, encoder, model


def generate(run_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """``tunesmith generate`` on a PPO run: stream its policy's greedy answer to ``prompt``, framed as
    the run framed its prompts (``ppo.instruction``, the system prompt, the chat template)."""
    run = Run(run_dir, writer=False)
    config = load_ppo_config(run.path / "config.yaml")
    method = get_method(config.method.name)
    weights = run.saved(method)
    if not weights.is_dir():
        raise TunesmithError(f"{run.path}: the run has no saved {weights.name}/ (status: {run.status()})")
    tokenizer, encoder, model = base_parts(config)
    model = method.load(model, weights).eval()
    text = framed(encoder, config.ppo.instruction.format(text=prompt))
    return greedy_answer(model, tokenizer, text, max_new_tokens, stream=True)


def run_ppo(config: PPOConfig, resume: bool = False, reward: RewardFn | None = None,
            on_step: Callable[[int], None] | None = None) -> Path:
    """Train with PPO as ``config`` says; returns the path of report.md. ``reward`` replaces the
    reward run (tests give a Python function)."""
    with on_sigterm() as stop:  # from here on, a SIGTERM stops the run at whatever phase it is in
        run = Run(config.output.dir)
        run.check_new(resume)
        setup_threads(config.train.threads)
        torch.manual_seed(config.train.seed)  # the adapter's and value head's initial weights
        parts = Parts(config, reward)  # every input problem surfaces here, before anything is written
        with run.ending():
            run.set_status("running")
            run.save_config(config)
            return _run(parts, run, resume, on_step, stop)


def _run(parts: Parts, run: Run, resume: bool, on_step, stop: StopRequest) -> Path:
    config = parts.config
    cfg, train = config.ppo, config.train
    base = run.load_json("base_eval") if resume else None
    if base is None:
        print("scoring the base model's answers to held-out prompts ...")
        base = evaluate(parts, adapter=False)
        run.save_json("base_eval", base)
    print(f"base: mean reward {base['mean_reward']:.4f}")

    answers = cfg.prompts_per_step * cfg.samples_per_prompt
    updates = cfg.ppo_epochs * math.ceil(answers / cfg.minibatch_size)
    optimizer = make_optimizer(parts.policy, train)
    scheduler = make_scheduler(optimizer, train, train.max_steps * updates)
    kl = ppo.AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target else ppo.FixedKL(cfg.kl_coef)
    step = 0
    if resume and run.has_checkpoint():
        state, rng = load_checkpoint(run.checkpoints, parts.policy, optimizer, scheduler)
        step, kl.value = state["step"], state["kl_coef"]
        distributed.set_random_state(rng)
    keep_metrics_until(run.metrics_log, step)  # steps after the checkpoint are taken again
    trainable, total = count_parameters(parts.policy)
    print(f"method {config.method.name} + value head: {trainable:,} trainable parameters of {total:,}")

    def save(at: int, kl_coef: float, rng: dict) -> None:
        save_checkpoint(run.checkpoints, parts.policy, optimizer, scheduler,
                        {"step": at, "kl_coef": kl_coef}, [rng])

    started = time.perf_counter()
    # A SIGTERM stops sampling and scoring at once (the step is taken again on resume, with the same
    # random state); once the step's first update has begun, it stops at the step's end.
    hold = UpdateHold(stop, optimizer)
    kl_at_start, rng_at_start, in_step = kl.value, distributed.random_state(), False
    try:
        with run.metrics_log.open("a") as log:
            while step < train.max_steps:
                if stop.is_set():
                    raise Interrupted(at_boundary=True)
                kl_at_start, rng_at_start, in_step = kl.value, distributed.random_state(), True
                record = ppo_step(parts, optimizer, scheduler, kl, prompts_of_step(
                    parts.train_prompts, step, cfg.prompts_per_step, train.seed))
                step += 1
                in_step = False
                record = {"step": step, **record}
                log.write(json.dumps(record) + "\n")
                log.flush()
                hold.end()
                print(f"step {step}: reward {record['reward']:.4f}  kl {record['kl']:.4f}  "
                      f"policy_loss {record['policy_loss']:.4f}  value_loss {record['value_loss']:.4f}")
                if step % train.save_every == 0 or step == train.max_steps:
                    save(step, kl.value, distributed.random_state())
                if on_step:
                    on_step(step)
    except KeyboardInterrupt:
        optimizer.zero_grad(set_to_none=True)
        if in_step:
            save(step, kl_at_start, rng_at_start)
        else:
            save(step, kl.value, distributed.random_state())
        raise
    finally:
        hold.remove()
    seconds = time.perf_counter() - started
    return finish(parts, run, base, step, seconds, trainable, total)


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


@torch.no_grad()
def evaluate(parts: Parts, adapter: bool = True) -> dict:
    """One sampled answer per held-out prompt (a fixed seed, apart from training's random stream):
    their scores, their KL to the reference, and the answers."""
    policy, cfg = parts.policy, parts.config.ppo
    with torch.random.fork_rng(devices=[parts.device] if parts.device.type == "cuda" else []):
        torch.manual_seed(parts.config.train.seed + 1)
        if adapter:
            rollout, prompts, texts, scores = parts.rollout(parts.eval_prompts, 1)
        else:
            with policy.model.disable_adapter():
                rollout, prompts, texts, scores = parts.rollout(parts.eval_prompts, 1)
    logp = answer_logprobs(policy, rollout, cfg.temperature)[0]
    ref = reference_logprobs(policy, rollout, cfg.temperature)
    kl = ((logp - ref) * rollout.mask).sum(1)
    return {"mean_reward": float(scores.mean()), "rewards": scores.tolist(), "kl": float(kl.mean()),
            "ended": float(rollout.ended.float().mean()), "prompts": prompts, "answers": texts}


def finish(parts: Parts, run: Run, base: dict, steps: int, seconds: float, trainable: int, total: int) -> Path:
    """Score the tuned model's answers, save adapter and value head, write metrics.json and the report."""
    from safetensors.torch import save_file

    print("scoring the tuned model's answers to held-out prompts ...")
    tuned = evaluate(parts)
    print(f"tuned: mean reward {tuned['mean_reward']:.4f} (base {base['mean_reward']:.4f}), KL {tuned['kl']:.4f}")
    saved = run.saved(parts.method)
    parts.method.save(parts.policy.model, saved)
    parts.tokenizer.save_pretrained(saved)
    make_portable(run, saved, model_origin(parts.config.model.name), parts.method.name)
    save_file({k: v.contiguous() for k, v in parts.policy.value_head.state_dict().items()}, run.path / VALUE_HEAD)
    wins = [1.0 if t > b else 0.5 if t == b else 0.0 for t, b in zip(tuned["rewards"], base["rewards"])]
    summary = {
        "model": parts.config.model.name,
        "method": parts.method.name,
        "reward_run": parts.config.ppo.reward,
        "trainable_params": trainable,
        "total_params": total,
        "steps": steps,
        "train_seconds": seconds,
        "eval_prompts": len(parts.eval_prompts),
        "base": {k: base[k] for k in ("mean_reward", "kl", "ended")},
        "tuned": {k: tuned[k] for k in ("mean_reward", "kl", "ended")},
        "win_rate": sum(wins) / len(wins),
    }
    has_plot = plot_curves(run.metrics_log, run.path / "curves.png")
    run.save_json("metrics", summary)  # metrics.json and report.md last: their presence means the run finished
    return write_report(run.path, summary, base, tuned, has_plot)
