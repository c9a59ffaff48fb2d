"""The training loop: AdamW, warm-up then decay, accumulation, clipping, validation, early stopping,
checkpoints and resume. Built on accelerate so the same loop runs on CPU, one GPU or many.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tunesmith.config import TrainConfig
from tunesmith.data.format import IGNORE
from tunesmith.methods.base import unwrap
from tunesmith.train.checkpoint import load_checkpoint, save_checkpoint
from tunesmith.train.loss import loss_sum
from tunesmith.train.packing import collate, plan_batches


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    tokens: int = 0  # trained (labelled) tokens seen
    input_tokens: int = 0  # non-padding tokens processed
    best_val: float = math.inf
    best_step: int = -1
    bad_evals: int = 0
    stopped_early: bool = False


@dataclass
class Batches:
    """The micro-batches of a causal LM training set, reshuffled each epoch with a seeded order.

    Packed rows by default; ``one_per_row`` gives length-grouped batches of one example per row,
    right-padded (``train.packing: false``, or a method that cannot pack). The loop only uses
    ``epoch``, ``tensors``, ``loss``, ``trained_tokens``, ``input_tokens`` and ``mean_loss``, which
    the other task types (``tunesmith.tasks.TaskBatches``) provide too.
    """

    examples: list[dict]
    batch_tokens: int
    row_len: int
    seed: int
    pad_id: int
    one_per_row: bool = False
    direct: bool = True  # the label-only output projection (see train/loss.py)

    def epoch(self, epoch: int) -> list[list[list[int]]]:
        return plan_batches(self.examples, self.batch_tokens, self.row_len, self.seed + epoch, self.one_per_row)

    def tensors(self, rows) -> dict[str, torch.Tensor]:
        return collate(self.examples, rows, self.row_len, self.pad_id)

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        return loss_sum(model, batch, self.direct)

    @staticmethod
    def trained_tokens(batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    @staticmethod
    def input_tokens(batch) -> int:
        return int((batch["seq_ids"] >= 0).sum())

    def mean_loss(self, model, examples: list[dict]) -> float:
        return evaluate_loss(model, examples, self.batch_tokens, self.row_len, self.pad_id, self.direct,
                             self.one_per_row)


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
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


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


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (fast) on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, check, lambda: False)()
                   for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def uses_bf16(mixed_precision: str, device: torch.device) -> bool:
    """Whether ``train.mixed_precision`` turns bf16 autocast on ("auto": where bf16 is native)."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and native_bf16(device))


def autocast(mixed_precision: str, device: torch.device):
    """bf16 autocast where ``uses_bf16``, else a no-op.

    Weights, gradients and optimizer state stay float32; matmuls run in bf16.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(mixed_precision, device) else nullcontext()


def backward_micro_batches(model, accelerator, batches, tensors: list[dict[str, torch.Tensor]],
                           mixed_precision: str = "no") -> tuple[float, int]:
    """Backward through the micro-batches of one optimizer step; returns (summed loss, trained tokens).

    Each micro-batch's loss sum is divided by the trained tokens of the whole step, so accumulating
    k micro-batches gives the same gradient as one batch k times as large.
    """
    n_tokens = sum(batches.trained_tokens(t) for t in tensors)
    step_loss = 0.0
    for i, t in enumerate(tensors):
        t = {k: v.to(accelerator.device) for k, v in t.items()}
        sync = accelerator.no_sync(model) if i < len(tensors) - 1 else nullcontext()
        with sync:
            with autocast(mixed_precision, accelerator.device):
                s, _ = batches.loss(model, t)
            accelerator.backward(s / max(n_tokens, 1))
        step_loss += s.item()
    return step_loss, n_tokens


@torch.no_grad()
def evaluate_loss(model, examples: list[dict], batch_tokens: int, row_len: int, pad_id: int,
                  direct: bool = True, one_per_row: bool = False) -> float:
    """Mean loss per trained token over the examples."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for rows in plan_batches(examples, batch_tokens, row_len, seed=None, one_per_row=one_per_row):
        batch = collate(examples, rows, row_len, pad_id)
        s, n = loss_sum(model, batch, direct)
        total += s.item()
        count += n
    model.train(was_training)
    return total / max(count, 1)


def train(model, accelerator, batches: Batches, validation: list[dict], cfg: TrainConfig, run_dir: Path,
          resume: bool = False,
          on_step: Callable[[TrainState], None] | None = None) -> TrainState:
    """Train ``model`` in place. Ctrl-C saves a checkpoint and re-raises KeyboardInterrupt."""
    ckpt_dir = run_dir / "checkpoints"
    apply_speed_options(model, cfg)
    optimizer = make_optimizer(model, cfg)
    micro_per_epoch = len(batches.epoch(0))
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / cfg.grad_accum))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState()
    if resume:
        state = TrainState(**load_checkpoint(ckpt_dir / "last", model, optimizer, scheduler))
    params = [p for p in model.parameters() if p.requires_grad]
    log = (run_dir / "metrics.jsonl").open("a")
    val_every = cfg.eval_every
    val_set = validation[: cfg.eval_max_examples] if cfg.eval_max_examples else validation

    def validate() -> float:
        with autocast(cfg.mixed_precision, accelerator.device):
            val = batches.mean_loss(model, val_set)
        record = {"step": state.step, "val_loss": val}
        log.write(json.dumps(record) + "\n")
        log.flush()
        accelerator.log({"val/loss": val}, step=state.step)
        if val < state.best_val:
            state.best_val, state.best_step, state.bad_evals = val, state.step, 0
            ckpt_dir.mkdir(exist_ok=True)
            save_file(trainable_state(accelerator.unwrap_model(model)), ckpt_dir / "best.safetensors")
        else:
            state.bad_evals += 1
        return val

    order = batches.epoch(state.epoch)
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    rng_at_step_start = torch.get_rng_state()
    state_at_step_start = asdict(state)
    in_step = False
    model.train()
    try:
        while state.step < total_steps:
            rng_at_step_start = torch.get_rng_state()
            state_at_step_start = asdict(state)
            in_step = True
            started = time.perf_counter()
            micro = []
            while len(micro) < cfg.grad_accum:
                if state.micro_in_epoch >= len(order):
                    state.epoch += 1
                    state.micro_in_epoch = 0
                    order = batches.epoch(state.epoch)
                micro.append(order[state.micro_in_epoch])
                state.micro_in_epoch += 1
            tensors = [batches.tensors(rows) for rows in micro]
            step_loss, n_tokens = backward_micro_batches(model, accelerator, batches, tensors, cfg.mixed_precision)
            state.input_tokens += sum(batches.input_tokens(t) for t in tensors)
            grad_norm = None
            if cfg.max_grad_norm:
                grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += n_tokens
            in_step = False
            elapsed = time.perf_counter() - started
            loss = step_loss / max(n_tokens, 1)
            record = {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": grad_norm, "trained_tokens": n_tokens,
                      "tokens_per_s": sum(batches.input_tokens(t) for t in tensors) / elapsed}
            log.write(json.dumps(record) + "\n")
            log.flush()
            accelerator.log({"train/loss": loss, "train/lr": record["lr"]}, step=state.step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if val_set and (state.step % val_every == 0 or state.step == total_steps):
                val = validate()
                bar.write(f"step {state.step}: val_loss {val:.4f}" + (" (best)" if state.best_step == state.step else ""))
                if cfg.patience and state.bad_evals >= cfg.patience:
                    state.stopped_early = True
                    bar.write(f"early stop: no improvement in {cfg.patience} validations; best step {state.best_step}")
                    break
            if state.step % cfg.save_every == 0:
                save_checkpoint(ckpt_dir / "last", model, optimizer, scheduler, asdict(state), torch.get_rng_state())
            if on_step:
                on_step(state)
    except KeyboardInterrupt:
        # A step in progress is dropped: the checkpoint resumes from its start, RNG included.
        optimizer.zero_grad(set_to_none=True)
        if in_step:
            save_checkpoint(ckpt_dir / "last", model, optimizer, scheduler, state_at_step_start, rng_at_step_start)
        else:
            save_checkpoint(ckpt_dir / "last", model, optimizer, scheduler, asdict(state), torch.get_rng_state())
        raise
    finally:
        bar.close()
        log.close()
    if cfg.patience and (ckpt_dir / "best.safetensors").is_file() and state.best_step != state.step:
        load_trainable(accelerator.unwrap_model(model), load_file(ckpt_dir / "best.safetensors"))
        bar.write(f"restored the best checkpoint (step {state.best_step}, val_loss {state.best_val:.4f})")
    return state
