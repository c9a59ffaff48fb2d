"""tunesmith against TRL's DPOTrainer: the same DPO job with LoRA, timed to the same held-out loss.

    python benchmarks/vs_trl_dpo.py --grid --plot docs/performance/vs_trl_dpo-CPU.png   # CPU: its kind
    python benchmarks/vs_trl_dpo.py                         # 64 pairs, 16 optimizer steps, the example's settings
    python benchmarks/vs_trl_dpo.py --pairs 4 --steps 2 --eval-every 1 --grid   # smoke run

Both sides train the bundled SmolLM2-135M-Instruct with the settings of
examples/rotten_tomatoes_dpo.yaml (LoRA r=16 on every linear layer, sigmoid loss, beta, learning
rate), on the same pairs of builtin:rotten_tomatoes_pairs, from the same initial adapter weights.
TRL trains ``--steps`` optimizer steps with as many pairs per step as tunesmith's plan has on
average. Their reference is the policy with its adapter disabled. TRL is given the pairs in its
conversational form, so it renders them with the same chat template.

Every ``--eval-every`` optimizer steps both policies are scored by the same function (tunesmith's
DPO loss and reward accuracy on the validation pairs, float32, no gradients), with the clock stopped
(``harness.Clock``). The target is the lowest held-out loss TRL reaches (or ``--target``); a side's
time to quality is its training seconds at its first evaluation at or below it. tunesmith may train
with settings of its own (``--tunesmith-set``: other steps, learning rate, batch tokens); ``--grid``
runs the small grid of ``tunesmith_grid`` and keeps the setting that reaches the target first, chosen
on the validation pairs only (the test split is never read).

Each side runs in a child process of its own (``harness.measure``), so its peak resident memory is
its own; pairs/s counts the pairs trained over the training seconds alone. TRL is a benchmark-only
dependency: `pip install -e ".[bench]"`.

The last line reads: ``time-to-quality Nx  memory Mx  pairs/s Sx  loss tunesmith A trl B  accuracy
tunesmith C trl D  target T`` (time-to-quality: TRL's training seconds to the target over
tunesmith's; memory: tunesmith's peak RSS over TRL's; pairs/s: tunesmith's over TRL's; loss: the
lowest each reached, accuracy: at that evaluation).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from harness import (ROOT, Clock, fastest, lora_model, machine, measure, plot_curves, quality_options, serve_child,
                     time_to_quality, trl_evaluations)

CONFIG = ROOT / "examples" / "rotten_tomatoes_dpo.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=64, help="training pairs")
    p.add_argument("--eval-pairs", type=int, default=15, help="validation pairs scored at each evaluation")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps (TRL, and tunesmith unless told otherwise)")
    quality_options(p, every=2, grid="tunesmith_grid: the example's settings, twice the learning rate, "
                                      "half the batch tokens for twice the steps")
    return p.parse_args(argv)


def tunesmith_grid(steps: int, lr: float) -> dict[str, list[str]]:
    """tunesmith's candidate settings for --grid: name -> overrides of the example config."""
    return {"example": [], "lr x2": [f"train.lr={2 * lr:g}"],
            "batch 1024, 2x steps": ["train.batch_tokens=1024", f"train.max_steps={2 * steps}"]}


def prepare_spec(args) -> dict:
    """The pairs, as text for TRL and encoded for tunesmith: the same rows for both."""
    from tunesmith.config import load_config
    from tunesmith.session import Session

    config = load_config(CONFIG, args.overrides)
    session = Session(config)
    data = session.prepare()
    t = config.train
    system = config.data.system_prompt

    def conversational(e: dict) -> dict:
        prompt = ([{"role": "system", "content": system}] if system else []) + e["messages"]
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": e["chosen"]}],
                "rejected": [{"role": "assistant", "content": e["rejected"]}]}

    return {"model": session.model_source, "method": config.method.model_dump(), "objective": config.objective.model_dump(),
            "pad_id": session.tokenizer.pad_token_id, "max_length": config.data.max_length,
            "batch_tokens": session.layout.batch_tokens, "lr": t.lr, "weight_decay": t.weight_decay,
            "max_grad_norm": t.max_grad_norm, "seed": t.seed, "steps": args.steps, "overrides": args.overrides,
            "eval_every": args.eval_every, "items": data.encoded["train"][: args.pairs],
            "texts": [conversational(e) for e in data.examples["train"][: args.pairs]],
            "held_out": data.encoded["validation"][: args.eval_pairs]}  # never the test split


def step_plan(spec: dict, batch_tokens: int, steps: int) -> list[list[int]]:
    """tunesmith's micro-batches (one per optimizer step) for ``steps`` steps, epoch after epoch."""
    batches = _batches(spec, spec["items"], batch_tokens)
    plan, epoch = [], 0
    while len(plan) < steps:
        plan += batches.epoch(epoch)
        epoch += 1
    return plan[:steps]


def _batches(spec: dict, items: list[dict], batch_tokens: int):
    from tunesmith.objectives.base import Layout
    from tunesmith.objectives.dpo import Options, PairBatches

    layout = Layout(batch_tokens, spec["max_length"], spec["pad_id"], spec["seed"])
    return PairBatches(items, layout, reference=None, options=Options(**spec["objective"]))


def _scored(model, spec: dict) -> dict:
    import torch

    with torch.no_grad():
        figures = _batches(spec, spec["held_out"], spec["batch_tokens"]).figures(model, spec["held_out"])
    return {"loss": figures["loss"], "accuracy": figures["accuracy"]}


def show(name: str, r: dict) -> str:
    curve = "  ".join(f"{p['step']}:{p['seconds']:.0f}s/{p['loss']:.4f}" for p in r["curve"])
    return (f"{name:<32} {r['pairs_per_s']:6.2f} pairs/s  {r['train_s']:7.1f} s  {r['steps']:>3} steps  "
            f"peak RSS {r['peak_rss_mb']:6.0f} MB\n    held-out loss (step:seconds/loss) {curve}")


def main(argv=None) -> None:
    if serve_child(CHILDREN):
        return
    args = parse_args(argv)
    print(f"machine: {machine()}")
    spec = prepare_spec(args)
    plan = step_plan(spec, spec["batch_tokens"], args.steps)
    print(f"{len(spec['items'])} training pairs, TRL: {args.steps} steps of {sum(map(len, plan)) / len(plan):.1f} "
          f"pairs on average, {len(spec['held_out'])} validation pairs")
    trl = {"trl": measure(__file__, "trl", spec)}
    print(show("trl", trl["trl"]), flush=True)
    target = args.target
    if target is None:
        target = min(p["loss"] for p in trl["trl"]["curve"] if p["step"] > 0)  # once trained, not the shared base
    grid = tunesmith_grid(args.steps, spec["lr"]) if args.grid else {" ".join(args.settings) or "example": []}
    ours = {}
    for name, settings in grid.items():
        ours[f"tunesmith: {name}"] = measure(__file__, "tunesmith", {**spec, "settings": settings + args.settings})
        print(show(f"tunesmith: {name}", ours[f"tunesmith: {name}"]), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    mine = fastest(ours, "loss", target, higher=False)
    if args.plot:
        title = f"tunesmith vs TRL DPOTrainer, LoRA on SmolLM2-135M; {machine().split(', torch')[0]}"
        curves = {name + (" (chosen)" if name == mine else ""): r["curve"] for name, r in {**ours, **trl}.items()}
        plot_curves(args.plot, curves, "loss", target, title)
    print(f"target {target:.4f}; tunesmith's setting reaching it first: {mine}")
    ratio = time_to_quality({"tunesmith": ours[mine]["curve"], "trl": trl["trl"]["curve"]}, "loss", target,
                            higher=False)
    a, b = ours[mine], trl["trl"]
    best = {side: min(r["curve"], key=lambda p: p["loss"]) for side, r in (("tunesmith", a), ("trl", b))}
    print(f"time-to-quality {ratio}  memory {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x  "
          f"pairs/s {a['pairs_per_s'] / b['pairs_per_s']:.2f}x  "
          f"loss tunesmith {best['tunesmith']['loss']:.4f} trl {best['trl']['loss']:.4f}  "
          f"accuracy tunesmith {best['tunesmith']['accuracy']:.2f} trl {best['trl']['accuracy']:.2f}  "
          f"target {target:.4f}")


def child_tunesmith(spec: dict) -> dict:
    """tunesmith's own loop, one micro-batch per optimizer step, as the example config says, plus its
    own ``settings``; the held-out figures every ``eval_every`` steps through ``fit``'s step hook."""
    from accelerate import Accelerator

    from tunesmith.config import load_config
    from tunesmith.train.loop import fit
    from tunesmith.train.processes import setup_threads

    config = load_config(CONFIG, [*spec["overrides"], f"train.max_steps={spec['steps']}", *spec["settings"]])
    cfg = config.train.model_copy(update={"grad_accum": 1, "eval_max_examples": None, "save_every": 10**9,
                                          "patience": None})
    setup_threads(cfg.threads)
    model = lora_model(spec["model"], config.model.dtype, spec["method"], spec["seed"])
    batch_tokens = max(cfg.batch_tokens, spec["max_length"])
    batches = _batches(spec, spec["items"], batch_tokens)
    clock = Clock(lambda m: _scored(m, spec), "loss")
    clock.evaluate(model, 0)

    def on_step(state) -> None:
        if state.step % spec["eval_every"] == 0:
            clock.evaluate(model, state.step)

    with tempfile.TemporaryDirectory() as run_dir:
        state = fit(model, Accelerator(cpu=True), batches, [], cfg, Path(run_dir), on_step=on_step)
    clock.finish(model, state.step)
    pairs = sum(map(len, step_plan(spec, batch_tokens, state.step)))
    return {"train_s": clock.spent, "pairs_per_s": pairs / clock.spent, "steps": state.step, "curve": clock.curve}


def child_trl(spec: dict) -> dict:
    """TRL's DPOTrainer on the same pairs, with as many pairs per step as tunesmith's plan on average."""
    import logging
    import math

    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tunesmith.model import load_tokenizer
    from tunesmith.train.precision import native_bf16

    logging.getLogger("transformers").setLevel(logging.ERROR)
    plan = step_plan(spec, spec["batch_tokens"], spec["steps"])
    per_step = math.ceil(sum(map(len, plan)) / len(plan))
    objective = spec["objective"]
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=True, seed=spec["seed"], data_seed=spec["seed"],
        max_steps=spec["steps"], per_device_train_batch_size=per_step, gradient_accumulation_steps=1,
        learning_rate=spec["lr"], weight_decay=spec["weight_decay"], max_grad_norm=spec["max_grad_norm"] or 0.0,
        optim="adamw_torch", gradient_checkpointing=False, beta=objective["beta"],
        bf16=native_bf16(torch.device("cpu")),  # bf16 autocast where native, as tunesmith's mixed_precision: auto
        loss_type=[objective["loss"]], label_smoothing=objective["label_smoothing"], max_length=spec["max_length"],
        eval_strategy="no", save_strategy="no", logging_steps=10**6, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0)
    model = lora_model(spec["model"], "float32", spec["method"], spec["seed"])
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(spec["texts"]),
                         processing_class=load_tokenizer(spec["model"]))
    clock = Clock(lambda m: _scored(m, spec), "loss")
    trainer.add_callback(trl_evaluations(clock, spec["eval_every"]))
    clock.evaluate(trainer.model, 0)
    trainer.train()
    clock.finish(trainer.model, trainer.state.global_step)
    return {"train_s": clock.spent, "pairs_per_s": per_step * spec["steps"] / clock.spent, "steps": spec["steps"],
            "curve": clock.curve}


CHILDREN = {"tunesmith": child_tunesmith, "trl": child_trl}


if __name__ == "__main__":
    main()
