"""tunesmith against TRL's KTOTrainer: the same KTO job with LoRA, timed to the same held-out loss.

    python benchmarks/vs_trl_kto.py                          # 96 answers, 24 optimizer steps
    python benchmarks/vs_trl_kto.py --answers 16 --steps 2 --eval-every 1   # smoke run

Both sides train the bundled SmolLM2-135M-Instruct with the settings of
examples/rotten_tomatoes_kto.yaml (LoRA r=16 on every linear layer, beta, the desirable and
undesirable weights, the learning rate and its schedule: ``train.scheduler`` with
``train.warmup_ratio`` of the steps, which TRL gets as ``lr_scheduler_type`` and ``warmup_steps``),
on the same answers marked good or bad of builtin:rotten_tomatoes_thumbs, from the same initial
adapter weights, for the same number of optimizer steps with as many answers per step as tunesmith's
plan has on average. Both take the reference as the policy with its adapter disabled and estimate
the reference point from each micro-batch's mismatched pairs. TRL is given the answers in its
conversational form, so it renders them with the same chat template. Both train in the same
precision: bf16 autocast on a CPU with native bf16 (the example's ``train.mixed_precision: auto``;
TRL's ``bf16=True``), float32 elsewhere.

Every ``--eval-every`` steps both policies are scored by the same function (tunesmith's KTO figures
on the held-out answers, float32: loss, accuracy, reward margin), outside the timed training. The
target is the lowest held-out loss TRL reaches (or ``--target``); time-to-loss is the training time
at a side's first evaluation at or below it.

Each side runs in a child process of its own (``harness.measure``), so its peak resident memory is
its own. TRL is a benchmark-only dependency: `pip install -e ".[bench]"`.

The last line reads: ``time-to-loss Nx  memory Mx  loss tunesmith A trl B  accuracy tunesmith C trl D
target T  speedup Sx`` (time-to-loss: TRL's time to the target over tunesmith's; memory: tunesmith's
peak RSS over TRL's; speedup: answers/s, tunesmith's over TRL's).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from harness import (
    ROOT,
    Clock,
    best_after_start,
    both_sides,
    lora_model,
    machine,
    same_initial_adapter,
    serve_child,
    time_to_quality,
)

CONFIG = ROOT / "examples" / "rotten_tomatoes_kto.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--answers", type=int, default=96, help="training answers")
    p.add_argument("--eval-answers", type=int, default=30, help="held-out answers scored at each evaluation")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps (both sides)")
    p.add_argument("--eval-every", type=int, default=6, help="held-out evaluation every N steps")
    p.add_argument("--target", type=float, default=None, help="held-out loss to reach (default: TRL's lowest)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the example config (e.g. train.batch_tokens=2048); repeatable")
    return p.parse_args(argv)


class Prepared:
    """The example's data as ``tunesmith train`` prepares it, and its objective (the KTO batches and
    their figures): the parent plans the steps with it, each child scores with it."""

    def __init__(self, overrides: list[str]):
        from tunesmith.config import load_config
        from tunesmith.session import Session

        self.config = load_config(CONFIG, [*overrides, "eval.judge=null"])
        self.session = Session(self.config)
        self.data = self.session.prepare()

    def batches(self, items: list[dict]):
        return self.session.objective.batches(items)

    def plan(self, items: list[dict], steps: int) -> list[list[int]]:
        """tunesmith's micro-batches (one per optimizer step) for ``steps`` steps, epoch after epoch."""
        batches, plan, epoch = self.batches(items), [], 0
        while len(plan) < steps:
            plan += batches.epoch(epoch)
            epoch += 1
        return plan[:steps]


def prepare_spec(args) -> dict:
    import torch

    from tunesmith.train.precision import uses_bf16

    prepared = Prepared(args.overrides)
    config, data = prepared.config, prepared.data
    system = config.data.system_prompt
    train = data.examples["train"][: args.answers]
    held_out = (data.encoded["test"] + data.encoded["validation"])[: args.eval_answers]

    def conversational(e: dict) -> dict:
        prompt = ([{"role": "system", "content": system}] if system else []) + e["messages"]
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": e["completion"]}],
                "label": bool(e["desirable"])}

    plan = prepared.plan(data.encoded["train"][: args.answers], args.steps)
    return {"model": prepared.session.model_source, "method": config.method.model_dump(),
            "objective": config.objective.model_dump(), "overrides": args.overrides, "steps": args.steps,
            "eval_every": args.eval_every, "max_length": config.data.max_length, "lr": config.train.lr,
            "weight_decay": config.train.weight_decay, "max_grad_norm": config.train.max_grad_norm,
            "warmup_ratio": config.train.warmup_ratio, "scheduler": config.train.scheduler,
            "seed": config.train.seed, "answers": args.answers, "plan": plan,
            "texts": [conversational(e) for e in train], "held_out_count": len(held_out),
            "mixed_precision": config.train.mixed_precision,
            "bf16": uses_bf16(config.train.mixed_precision, torch.device("cpu"))}


def main(argv=None) -> None:
    if serve_child(CHILDREN):
        return
    args = parse_args(argv)
    print(f"machine: {machine()}")
    spec = prepare_spec(args)
    plan = spec["plan"]
    print(f"{spec['answers']} training answers ({sum(t['label'] for t in spec['texts'])} good), {args.steps} steps "
          f"of {sum(map(len, plan)) / len(plan):.1f} answers on average, {spec['held_out_count']} held-out answers")
    print(f"precision, both sides: {'bf16 autocast' if spec['bf16'] else 'float32'} (train.mixed_precision "
          f"{spec['mixed_precision']})")
    results = both_sides(__file__, spec, "loss", lambda r: f"{r['answers_per_s']:6.2f} answers/s  {r['train_s']:7.1f} s")
    ours, theirs = results["tunesmith"], results["trl"]
    target = args.target if args.target is not None else best_after_start(theirs["curve"], "loss", higher=False)
    ratio = time_to_quality({side: r["curve"] for side, r in results.items()}, "loss", target, higher=False)
    last = {side: r["curve"][-1] for side, r in results.items()}
    print(f"time-to-loss {ratio}  memory {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x  "
          f"loss tunesmith {last['tunesmith']['loss']:.4f} trl {last['trl']['loss']:.4f}  "
          f"accuracy tunesmith {last['tunesmith']['accuracy']:.2f} trl {last['trl']['accuracy']:.2f}  "
          f"target {target:.4f}  speedup {ours['answers_per_s'] / theirs['answers_per_s']:.2f}x")


class HeldOut:
    """Both sides' score: tunesmith's KTO figures on the held-out answers."""

    def __init__(self, prepared: Prepared, count: int):
        data = prepared.data
        self.items = (data.encoded["test"] + data.encoded["validation"])[:count]
        self.batches = prepared.batches(self.items)

    def __call__(self, model) -> dict:
        figures = self.batches.figures(model, self.items)
        return {k: figures[k] for k in ("loss", "accuracy", "reward_margin") if k in figures}


def child_tunesmith(spec: dict) -> dict:
    """tunesmith's own loop (``train.loop.fit``) over the plan's micro-batches, one per optimizer step;
    the held-out figures every ``eval_every`` steps through ``fit``'s step hook."""
    from accelerate import Accelerator

    from tunesmith.train.loop import fit
    from tunesmith.train.processes import setup_threads

    prepared = Prepared(spec["overrides"])
    config = prepared.config
    cfg = config.train.model_copy(update={"epochs": 10**6, "max_steps": spec["steps"], "grad_accum": 1,
                                          "eval_max_examples": None, "save_every": 10**9, "patience": None})
    setup_threads(cfg.threads)
    model = same_initial_adapter(lora_model(spec["model"], config.model.dtype, spec["method"], spec["seed"]),
                                 spec["seed"])
    items = prepared.data.encoded["train"][: spec["answers"]]
    batches = prepared.batches(items)
    assert prepared.plan(items, spec["steps"]) == spec["plan"], "the plan differs"
    clock = Clock(HeldOut(prepared, spec["held_out_count"]), "loss")
    clock.evaluate(model, 0)

    def on_step(state) -> None:
        step = state.step
        if step % spec["eval_every"] == 0 or step == spec["steps"]:
            clock.evaluate(model, step)

    with tempfile.TemporaryDirectory() as run_dir:
        fit(model, Accelerator(cpu=True), batches, [], cfg, Path(run_dir), on_step=on_step)
    answers = sum(map(len, spec["plan"]))
    return {"train_s": clock.spent, "answers_per_s": answers / clock.spent, "curve": clock.curve}


def child_trl(spec: dict) -> dict:
    """TRL's KTOTrainer on the same answers, with as many answers per step as tunesmith's plan on average."""
    import logging

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import KTOConfig, KTOTrainer

    from tunesmith.model import load_tokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    prepared = Prepared(spec["overrides"])
    plan = spec["plan"]
    per_step = math.ceil(sum(map(len, plan)) / len(plan))
    objective = spec["objective"]
    weights = prepared.session.objective.weights  # after objective.balance, as tunesmith trains
    # tunesmith's learning-rate schedule (train.scheduler, train.warmup_ratio, rounded as tunesmith rounds),
    # not TRL's default (linear, no warmup): the same job on both sides.
    warmup = int(spec["warmup_ratio"] * spec["steps"])
    schedule = "constant_with_warmup" if spec["scheduler"] == "constant" else spec["scheduler"]
    args = KTOConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=True, seed=spec["seed"], data_seed=spec["seed"],
        max_steps=spec["steps"], per_device_train_batch_size=per_step, gradient_accumulation_steps=1,
        learning_rate=spec["lr"], lr_scheduler_type=schedule, warmup_steps=warmup,
        weight_decay=spec["weight_decay"], max_grad_norm=spec["max_grad_norm"] or 0.0,
        optim="adamw_torch", gradient_checkpointing=False, beta=objective["beta"],
        # The precision tunesmith trains in (train.mixed_precision: auto is bf16 autocast where bf16 is
        # native): TRL gets bf16 autocast where tunesmith has it, float32 where it does not.
        bf16=spec["bf16"],
        desirable_weight=weights[0], undesirable_weight=weights[1], max_length=spec["max_length"],
        eval_strategy="no", save_strategy="no", logging_steps=10**6, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0)
    model = same_initial_adapter(lora_model(spec["model"], "float32", spec["method"], spec["seed"]), spec["seed"])
    held_out = HeldOut(prepared, spec["held_out_count"])

    class Evaluate(TrainerCallback):
        def __init__(self):
            self.clock = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.clock = Clock(held_out, "loss")
            self.clock.evaluate(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % spec["eval_every"] == 0 or state.global_step == spec["steps"]:
                self.clock.evaluate(model, state.global_step)

    callback = Evaluate()
    trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(spec["texts"]),
                         processing_class=load_tokenizer(spec["model"]), callbacks=[callback])
    trainer.train()
    spent = callback.clock.spent
    return {"train_s": spent, "answers_per_s": per_step * spec["steps"] / spent, "curve": callback.clock.curve}


CHILDREN = {"tunesmith": child_tunesmith, "trl": child_trl}


if __name__ == "__main__":
    main()
