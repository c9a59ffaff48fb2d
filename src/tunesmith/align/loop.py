"""What the alignment recipes (PPO, GRPO) share, for them to compose with their own step:

- ``Policy``: the base model with the method's adapter (disabled, the reference), its tokenizer and
  prompt framing, and the config's prompts, training and held-out, each with its row;
- ``run_recipe``: the run directory, its status and config, SIGTERM as a stop, around the recipe;
- ``run_steps``: the loop of steps, with ``metrics.jsonl``, checkpoints, ``--resume`` and the stops;
- ``evaluate``, ``base_evaluation``, ``save_policy``, ``win_rate``: the held-out evaluation and what a
  finished run saves;
- ``generate``: ``tunesmith generate`` on a PPO or GRPO run.

A recipe's step fills in the ``Algorithm`` protocol; the loop knows nothing else of it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from tunesmith.align.options import GRPOConfig, PPOConfig, load_align_config
from tunesmith.align.prompts import framed, framing, read_prompts
from tunesmith.align.rollout import Rollout, answer_texts, model_logprobs, reference_model_logprobs, sample
from tunesmith.errors import TunesmithError
from tunesmith.export.portable import make_portable
from tunesmith.methods import get_method
from tunesmith.model import lay_out_for_decoding, load_model, model_origin, resolve_model
from tunesmith.objectives.causal import greedy_answer
from tunesmith.stopping import Interrupted, StopRequest, UpdateHold, on_sigterm
from tunesmith.store import Run
from tunesmith.train import distributed
from tunesmith.train.checkpoint import load_checkpoint, save_checkpoint
from tunesmith.train.loop import keep_metrics_until
from tunesmith.train.processes import setup_threads

AlignConfig = PPOConfig | GRPOConfig
P = TypeVar("P")
# (prompts, answers, rows) -> (the answers' rewards, each named reward's scores: none for PPO)
Score = Callable[[list[str], list[str], list[dict]], tuple[torch.Tensor, dict[str, list[float]]]]


class Algorithm(Protocol):
    """One alignment method's step, as ``run_steps`` drives it."""

    shown: tuple[str, ...]  # the metrics printed after each step

    def step(self, index: int) -> dict:
        """Step ``index`` (from 0): sample, score, update; returns the step's metrics."""

    def state(self) -> dict:
        """What a checkpoint keeps besides the weights, optimizer and random state (PPO: its KL
        coefficient); plain data."""

    def load_state(self, state: dict) -> None:
        """Take back what ``state`` returned."""


class Policy:
    """What an alignment run samples from and trains: the base model with the method's adapter, on
    the run's device, in eval mode (no dropout: the log-probabilities of sampling and of the update
    must agree); its tokenizer and prompt framing; the prompts of the config's rollout section."""

    def __init__(self, config: AlignConfig):
        self.config = config
        self.options = cfg = config.rollout
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        prompts = read_prompts(cfg, config.train.seed)
        self.train_prompts, self.eval_prompts = prompts.split()
        self.train_rows, self.eval_rows = prompts.split_rows()
        self.method = get_method(config.method.name)
        self.tokenizer, self.encoder, model = base_parts(config)
        model = self.method.apply(model, config.method)
        self.model = model.to(self.device)
        lay_out_for_decoding(self.model)  # the frozen base: sampling many answers at once runs faster on CPU
        self.model.eval()

    def encode(self, prompts: list[str]) -> list[list[int]]:
        return [self.tokenizer(framed(self.encoder, p), add_special_tokens=False).input_ids for p in prompts]

    def sample(self, prompts: list[str], samples: int, record: bool = False,
               record_states: bool = True) -> tuple[Rollout, list[str]]:
        """``samples`` answers to each of ``prompts``, grouped by prompt: the rollout and the answers' texts."""
        cfg = self.options
        rollout = sample(self.model, self.tokenizer, self.encode(prompts), samples, cfg.max_new_tokens,
                         cfg.temperature, cfg.top_k, self.device, record=record, record_states=record_states)
        return rollout, answer_texts(self.tokenizer, rollout)


def base_parts(config: AlignConfig):
    """``(tokenizer, encoder, base model)``: the policy's base, and the framing of its prompts
    (``prompts.framing``)."""
    tokenizer, encoder = framing(config)
    model = load_model(resolve_model(config.model.name), "AutoModelForCausalLM", config.model.dtype,
                       **get_method(config.method.name).load_kwargs(config.method))
    return tokenizer, encoder, model


def run_recipe(config: AlignConfig, resume: bool, setup: Callable[[], P],
               body: Callable[[P, Run, StopRequest], Path]) -> Path:
    """``body(setup(), run, stop)`` inside a run directory: ``setup`` builds the recipe's parts (every
    input problem surfaces there, before anything is written), then the run is marked running with
    its config saved, and ends interrupted, failed or complete (``Run.ending``). A SIGTERM from here
    on stops the run at whatever phase it is in."""
    with on_sigterm() as stop:
        run = Run(config.output.dir)
        run.check_new(resume)
        setup_threads(config.train.threads)
        torch.manual_seed(config.train.seed)  # the adapter's (and value head's) initial weights
        parts = setup()
        with run.ending():
            run.set_status("running")
            run.save_config(config)
            return body(parts, run, stop)


def base_evaluation(run: Run, resume: bool, evaluate_base: Callable[[], dict]) -> dict:
    """The base model's held-out evaluation: kept from before when resuming, else computed and saved."""
    base = run.load_json("base_eval") if resume else None
    if base is None:
        print("scoring the base model's answers to held-out prompts ...")
        base = evaluate_base()
        run.save_json("base_eval", base)
    print(f"base: mean reward {base['mean_reward']:.4f}")
    return base


def run_steps(run: Run, module: torch.nn.Module, optimizer, scheduler, algorithm: Algorithm, max_steps: int,
              save_every: int, resume: bool, stop: StopRequest,
              on_step: Callable[[int], None] | None = None) -> tuple[int, float]:
    """Steps until ``max_steps``, from the last checkpoint when resuming: each step's metrics go to
    ``metrics.jsonl``, and ``module``'s trainable weights, the optimizer, the schedule, the
    algorithm's state and the random state to ``checkpoints/last`` every ``save_every`` steps and at
    the end. Returns ``(steps, seconds)``.

    A SIGTERM stops sampling and scoring at once: the step is taken again on resume, from the state
    and random state it started with, so it takes the same prompts and samples. Once a step's first
    update has begun, the stop waits for the step's end (``UpdateHold``). Either way a checkpoint is
    saved on the way out.
    """
    step = 0
    if resume and run.has_checkpoint():
        state, rng = load_checkpoint(run.checkpoints, module, optimizer, scheduler)
        step = state.pop("step")
        algorithm.load_state(state)
        distributed.set_random_state(rng)
    keep_metrics_until(run.metrics_log, step)  # steps after the checkpoint are taken again

    def save(at: int, state: dict, rng: dict) -> None:
        save_checkpoint(run.checkpoints, module, optimizer, scheduler, {"step": at, **state}, [rng])

    started = time.perf_counter()
    hold = UpdateHold(stop, optimizer)
    at_start, in_step = (algorithm.state(), distributed.random_state()), False
    try:
        with run.metrics_log.open("a") as log:
            while step < max_steps:
                if stop.is_set():
                    raise Interrupted(at_boundary=True)
                at_start, in_step = (algorithm.state(), distributed.random_state()), True
                record = {"step": step + 1, **algorithm.step(step)}
                step += 1
                in_step = False
                log.write(json.dumps(record) + "\n")
                log.flush()
                hold.end()
                print(f"step {step}: " + "  ".join(f"{k} {record[k]:.4f}" for k in algorithm.shown if k in record))
                if step % save_every == 0 or step == max_steps:
                    save(step, algorithm.state(), distributed.random_state())
                if on_step:
                    on_step(step)
    except KeyboardInterrupt:
        optimizer.zero_grad(set_to_none=True)
        save(step, *(at_start if in_step else (algorithm.state(), distributed.random_state())))
        raise
    finally:
        hold.remove()
    return step, time.perf_counter() - started


@torch.no_grad()
def evaluate(policy: Policy, score: Score, adapter: bool = True) -> dict:
    """One sampled answer per held-out prompt (a fixed seed, apart from training's random stream),
    from the policy or, without ``adapter``, its base: their rewards (and each named reward's mean),
    their KL to the reference (nats per answer), the share that ended, and the answers."""
    cfg, device = policy.options, policy.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(policy.config.train.seed + 1)
        with contextlib.nullcontext() if adapter else policy.model.disable_adapter():
            rollout, texts = policy.sample(policy.eval_prompts, 1)
            rewards, by_name = score(policy.eval_prompts, texts, policy.eval_rows)
    logp = model_logprobs(policy.model, rollout, cfg.temperature)
    ref = reference_model_logprobs(policy.model, rollout, cfg.temperature)
    kl = ((logp - ref) * rollout.mask).sum(1)
    out = {"mean_reward": float(rewards.mean()), "rewards": rewards.tolist(), "kl": float(kl.mean()),
           "ended": float(rollout.ended.float().mean()), "prompts": policy.eval_prompts, "answers": texts}
    if by_name:
        out["reward_means"] = {name: sum(s) / len(s) for name, s in by_name.items()}
        out["by_reward"] = by_name
    return out


def save_policy(policy: Policy, run: Run) -> None:
    """The tuned adapter in the method's format, with the tokenizer, named by its base's Hub id."""
    saved = run.saved(policy.method)
    policy.method.save(policy.model, saved)
    policy.tokenizer.save_pretrained(saved)
    make_portable(run, saved, model_origin(policy.config.model.name), policy.method.name)


def finish_policy(run: Run, policy: Policy, evaluate_tuned: Callable[[], dict], base: dict, kept: tuple[str, ...],
                  steps: int, seconds: float, trainable: int, total: int) -> tuple[dict, dict]:
    """What every alignment recipe does once its steps are done: score the tuned policy's answers to
    the held-out prompts, save it, and the summary fields every run's metrics.json has (``kept``: the
    held-out figures of base and tuned). Returns ``(summary, tuned)``; the recipe adds its own fields."""
    print("scoring the tuned model's answers to held-out prompts ...")
    tuned = evaluate_tuned()
    print(f"tuned: mean reward {tuned['mean_reward']:.4f} (base {base['mean_reward']:.4f}), KL {tuned['kl']:.4f}")
    save_policy(policy, run)
    summary = {
        "model": policy.config.model.name,
        "method": policy.method.name,
        "trainable_params": trainable,
        "total_params": total,
        "steps": steps,
        "train_seconds": seconds,
        "eval_prompts": len(policy.eval_prompts),
        "base": {k: base[k] for k in kept},
        "tuned": {k: tuned[k] for k in kept},
        "win_rate": win_rate(tuned["rewards"], base["rewards"]),
    }
    return summary, tuned


def win_rate(tuned: list[float], base: list[float]) -> float:
    """Tuned answers against base answers to the same prompts: a win 1, a tie 1/2, a loss 0; the mean."""
    wins = [1.0 if t > b else 0.5 if t == b else 0.0 for t, b in zip(tuned, base)]
    return sum(wins) / len(wins)


def generate(run_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """``tunesmith generate`` on a PPO or GRPO run: stream its policy's greedy answer to ``prompt``,
    framed as the run framed its prompts (the instruction, the system prompt, the chat template)."""
    run = Run(run_dir, writer=False)
    config = load_align_config(run.path / "config.yaml")
    method = get_method(config.method.name)
    weights = run.saved(method)
    if not weights.is_dir():
        raise TunesmithError(f"{run.path}: the run has no saved {weights.name}/ (status: {run.status()})")
    tokenizer, encoder, model = base_parts(config)
    model = method.load(model, weights).eval()
    text = framed(encoder, config.rollout.instruction.format(text=prompt))
    return greedy_answer(model, tokenizer, text, max_new_tokens, stream=True)
