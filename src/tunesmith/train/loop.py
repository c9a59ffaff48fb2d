"""The training loop: AdamW, warm-up then decay, accumulation, validation, early stopping,
checkpoints and resume. Built on accelerate, so the same loop runs on CPU, one GPU or many.

The loop knows nothing of objectives but the ``Batches`` protocol, and nothing of how a step
updates the model but the ``Step`` protocol: ``make_step`` builds the step (``DefaultStep`` unless
a caller such as private training supplies its own).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tunesmith.files import write_atomic
from tunesmith.model import unwrap
from tunesmith.objectives.base import Batches
from tunesmith.stopping import Interrupted, StopRequest, UpdateHold
from tunesmith.train import distributed, zero
from tunesmith.train.checkpoint import load_checkpoint, save_checkpoint
from tunesmith.train.options import VALIDATIONS, TrainConfig
from tunesmith.train.precision import autocast
from tunesmith.train.step import DefaultStep, LossForward, Step


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of the current epoch already consumed (by all processes)
    tokens: int = 0  # trained (labelled) tokens seen
    input_tokens: int = 0  # non-padding tokens processed
    best_val: float = math.inf
    best_step: int = -1  # the step that validated best; its weights are in best.safetensors
    kept_step: int = -1  # the step whose weights fit() ended with (train.keep_best), once it has ended
    bad_evals: int = 0
    stopped_early: bool = False
    val_loss: float | None = None  # the latest validation's, for callers that act on it (search pruning)
    val_step: int = -1  # the step of that validation


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm gains: decaying them towards 0 only hurts.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.scheduler == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trainable_state(model) -> dict[str, torch.Tensor]:
    # Copied to the CPU: a whole model's copy on the accelerator could run it out of memory.
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def apply_speed_options(model, cfg: TrainConfig) -> None:
    """Activation checkpointing and torch.compile of the decoder layers, as ``cfg`` asks (in place)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    inner = unwrap(model)
    if cfg.activation_checkpointing:
        # Non-reentrant checkpointing works when a layer's inputs need no grad (frozen embeddings);
        # transformers also makes the embedding output require grad for PEFT models.
        inner.activation_checkpointing_enable({"use_reentrant": False})
    if cfg.compile:
        for module in inner.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.compile()


def steps_per_epoch(batches: Batches, cfg: TrainConfig, processes: int) -> int:
    return max(1, math.ceil(len(batches.epoch(0)) / (cfg.grad_accum * processes)))


def planned_steps(batches: Batches, cfg: TrainConfig, processes: int) -> int:
    """The optimizer steps ``fit`` will take unless stopped early: ``max_steps``, or ``epochs`` of them."""
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch(batches, cfg, processes)))


def validation_interval(cfg: TrainConfig, total_steps: int) -> int:
    """Steps between validations: ``eval_every``, or about ``VALIDATIONS`` a run."""
    return cfg.eval_every or max(1, round(total_steps / VALIDATIONS))


def describe_plan(batches: Batches, cfg: TrainConfig, processes: int) -> str:
    """How many epochs of the training split the planned steps cover, in one line."""
    per_epoch = steps_per_epoch(batches, cfg, processes)
    total = planned_steps(batches, cfg, processes)
    return (f"planned {total} steps cover {total / per_epoch:.2f} epochs of the training split "
            f"({per_epoch} steps per epoch)")


MakeStep = Callable[..., Step]


def keep_metrics_until(metrics_log: Path, step: int) -> None:
    """Drop the log's records of steps after ``step`` (a resumed run's checkpoint; 0 for a run that
    starts again): the resumed run takes those steps again."""
    if not metrics_log.is_file():
        return
    kept = []
    for line in metrics_log.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the last line, torn by a crash while it was written
        if record.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    write_atomic(metrics_log, "".join(kept))


def fit(model, accelerator, batches: Batches, validation: list[dict], cfg: TrainConfig, checkpoints: Path,
        metrics_log: Path | None = None, resume: bool = False,
        on_step: Callable[[TrainState], None] | None = None, stop: StopRequest | None = None,
        make_step: MakeStep = DefaultStep, validation_figures: Callable[[int], dict] | None = None) -> TrainState:
    """Train ``model`` in place; returns the final loop state.

    ``validation_figures(step)`` adds figures to each validation record of metrics.jsonl (private
    training: the epsilon spent so far).

    ``stop`` (``stopping.on_sigterm``'s request): in one process, a SIGTERM stops training where it
    is, except during an optimizer update, which it lets finish; on several, every process stops at
    the next step boundary. Either way a checkpoint is saved and ``Interrupted`` raised. A stop (or
    Ctrl-C) within a step drops that step and saves a checkpoint from its start. Only the main
    process writes files.
    """
    main = accelerator.is_main_process
    sharded = distributed.sharded(accelerator)
    zero_stage = zero.stage(accelerator)  # under DeepSpeed, each process saves its own optimizer partition
    apply_speed_options(model, cfg)
    optimizer = make_optimizer(model, cfg)
    several = accelerator.num_processes > 1
    update_hold = UpdateHold(stop, optimizer) if stop is not None and not several else None
    micro_per_step = cfg.grad_accum * accelerator.num_processes
    total_steps = planned_steps(batches, cfg, accelerator.num_processes)
    eval_every = validation_interval(cfg, total_steps)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    distributed.set_deepspeed_batch(accelerator)
    forward, optimizer, scheduler = accelerator.prepare(LossForward(model, batches), optimizer, scheduler)
    step = make_step(forward, optimizer, scheduler, accelerator, batches, cfg)
    state = TrainState()
    if resume:
        loaded, rng = load_checkpoint(checkpoints, model, optimizer, scheduler, accelerator.process_index,
                                      zero_stage=zero_stage, processes=accelerator.num_processes)
        state = TrainState(**loaded)
        distributed.set_random_state(rng)
    if main and metrics_log:
        keep_metrics_until(metrics_log, state.step)  # steps after the checkpoint are taken again
    log = metrics_log.open("a") if main and metrics_log else None
    val_set = validation[: cfg.eval_max_examples] if cfg.eval_max_examples else validation

    def write(record: dict) -> None:
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()

    def save(at: dict, rng: dict, collective: bool = True) -> None:
        if (sharded or zero_stage is not None) and not collective:
            # Sharded weights are whole only once gathered, and ZeRO's partitions complete only once
            # every process has written its own: both need the processes together, which they are not.
            bar.write("no checkpoint saved: a resumed run starts from the last one")
            return
        states = distributed.gather_random_states(rng, accelerator) if collective else [rng]
        gathered = {"weights": distributed.trainable_weights(model)} if sharded else {}
        if zero_stage is not None:
            save_checkpoint(checkpoints, model, optimizer, scheduler, at, states, **gathered,
                            partition=zero.partition(optimizer), accelerator=accelerator)
            return
        if sharded:
            gathered["optimizer_state"] = distributed.optimizer_state(optimizer)
        if main:
            save_checkpoint(checkpoints, model, optimizer, scheduler, at, states, **gathered)

    def validate() -> float:
        # Sharded, each process holds the whole weights meanwhile: their shares may differ in batches.
        with distributed.whole_parameters(forward, accelerator):
            val = _validate()
        write({"step": state.step, "val_loss": val,
               **(validation_figures(state.step) if main and validation_figures else {})})
        accelerator.log({"val/loss": val}, step=state.step)
        return val

    def _validate() -> float:
        with autocast(cfg.mixed_precision, accelerator.device):
            total, count = batches.loss_totals(model, distributed.share(val_set, accelerator))
        val = distributed.total(total, accelerator) / max(distributed.total(count, accelerator), 1)
        state.val_loss, state.val_step = val, state.step
        if val < state.best_val:
            state.best_val, state.best_step, state.bad_evals = val, state.step, 0
            if main:
                checkpoints.mkdir(parents=True, exist_ok=True)
                save_file(trainable_state(model), checkpoints / BEST, metadata={"step": str(state.step)})
        else:
            state.bad_evals += 1
        return val

    order = batches.epoch(state.epoch)
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", disable=not main,
               dynamic_ncols=True)
    if main and several:
        bar.write(distributed.describe_sharding(accelerator))
    if main:
        bar.write(describe_plan(batches, cfg, accelerator.num_processes)
                  + (f"; validation every {eval_every} steps" if val_set else ""))
    rng_at_step_start, state_at_step_start, in_step = distributed.random_state(), asdict(state), False
    forward.train()
    # Several processes must agree on the step they stop at: a SIGTERM waits for the next boundary.
    loop_hold = stop.held() if stop is not None and several else nullcontext()
    try:
        with loop_hold:
            while state.step < total_steps and not state.stopped_early:
                if stop is not None and distributed.any_process(stop.is_set(), accelerator):
                    raise Interrupted(at_boundary=True)
                rng_at_step_start, state_at_step_start, in_step = distributed.random_state(), asdict(state), True
                started = time.perf_counter()
                micro = []
                while len(micro) < micro_per_step:
                    if state.micro_in_epoch >= len(order):
                        state.epoch += 1
                        state.micro_in_epoch = 0
                        order = batches.epoch(state.epoch)
                    micro.append(order[state.micro_in_epoch])
                    state.micro_in_epoch += 1
                tensors = [batches.tensors(m) for m in distributed.share(micro, accelerator)]
                result = step(tensors)
                input_tokens = distributed.total(sum(batches.input_tokens(t) for t in tensors), accelerator)
                state.step += 1
                state.tokens += result.trained_tokens
                state.input_tokens += input_tokens
                in_step = False
                loss = result.loss_sum / max(result.trained_tokens, 1)
                record = {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": result.grad_norm, "trained_tokens": result.trained_tokens,
                          "tokens_per_s": input_tokens / (time.perf_counter() - started)}
                write(record)
                if update_hold:
                    update_hold.end()  # the step is counted and logged: a SIGTERM during its update stops here
                accelerator.log({"train/loss": loss, "train/lr": record["lr"]}, step=state.step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if val_set and (state.step % eval_every == 0 or state.step == total_steps):
                    val = validate()
                    best = " (best)" if state.best_step == state.step else ""
                    bar.write(f"step {state.step}: val_loss {val:.4f}{best}")
                    if cfg.patience and state.bad_evals >= cfg.patience:
                        state.stopped_early = True
                        bar.write(f"early stop: no improvement in {cfg.patience} validations; "
                                  f"best step {state.best_step}")
                        break
                if state.step % cfg.save_every == 0:
                    save(asdict(state), distributed.random_state())
                if on_step:
                    on_step(state)
            if state.step % cfg.save_every:
                # Training is over: a stop during the tuned model's evaluation resumes from here, not
                # from the last periodic checkpoint or the start.
                save(asdict(state), distributed.random_state())
    except KeyboardInterrupt as interrupt:
        # A step in progress is dropped: the checkpoint resumes from its start, random state included.
        # Only a stop at an agreed boundary finds every process at the same step; otherwise they may
        # be at different places, and no collective is attempted.
        optimizer.zero_grad(set_to_none=True)
        if in_step:
            save(state_at_step_start, rng_at_step_start, collective=False)
        else:
            save(asdict(state), distributed.random_state(),
                 collective=isinstance(interrupt, Interrupted) and interrupt.at_boundary)
        raise
    finally:
        if update_hold:
            update_hold.remove()
        bar.close()
        if log:
            log.close()
    state.kept_step = state.step
    if state.best_step >= 0:
        line = keep_weights(model, accelerator, state, cfg.keep_best, checkpoints)
        if main:
            bar.write(line)
    return state


BEST = "best.safetensors"  # the trainable weights of the best validation so far, in the checkpoints folder


def keep_weights(model, accelerator, state: TrainState, keep_best: bool, checkpoints: Path) -> str:
    """End a run that validated with the weights of its best validated step (``keep_best``), loaded on
    every process, or with its last step's; sets ``state.kept_step`` to the best step when its weights
    are loaded, and says which step's are kept, in one line."""
    best, last = state.best_step, state.step
    if best == last:
        return f"kept the last step's weights (step {last}), the best validated (val_loss {state.best_val:.4f})"
    found = f"the best validated step was {best} (val_loss {state.best_val:.4f})"
    if not keep_best:
        return f"kept the last step's weights (step {last}, train.keep_best false); {found}"
    path = checkpoints / BEST
    saved_at = distributed.main_says(_saved_step(path), accelerator)  # every process acts alike
    if saved_at != best:
        # A resumed run may have validated a step again, after its checkpoint, without improving on it.
        held = f"holds step {saved_at}'s" if saved_at is not None else "is missing or unmarked"
        return f"kept the last step's weights (step {last}): {path} {held}, not step {best}'s"
    accelerator.wait_for_everyone()
    distributed.load_weights(model, load_file(path))
    state.kept_step = best
    return f"kept step {best}'s weights, the best validated (val_loss {state.best_val:.4f}), not the last step {last}'s"


def _saved_step(path: Path) -> int | None:
    if not path.is_file():
        return None
    with safe_open(path, "pt") as f:
        step = (f.metadata() or {}).get("step")
    return int(step) if step is not None else None
