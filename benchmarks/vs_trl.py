"""tunesmith against TRL's SFTTrainer: the same LoRA fine-tune, timed to the same validation loss.

    python benchmarks/vs_trl.py --grid --plot docs/performance/vs_trl-CPU.png   # docs/performance.md (CPU: its kind)
    python benchmarks/vs_trl.py                  # tunesmith with the demo's settings only
    python benchmarks/vs_trl.py --quick --grid   # smoke run: 48 training / 16 validation examples
    python benchmarks/vs_trl.py --tunesmith-set train.epochs=3 --tunesmith-set train.lr=2e-3   # other settings
    python benchmarks/vs_trl.py --only tunesmith --set train.mixed_precision=no   # tunesmith alone

Both sides fine-tune the bundled SmolLM2-135M-Instruct on the demo data (examples/rotten_tomatoes_lora.yaml)
with LoRA r=16 on every linear layer of the decoder, AdamW and a cosine schedule, from the same
tokenised examples (tunesmith's data pipeline: chat template, loss on the answer and its end-of-turn
token only) and the same initial adapter weights. TRL trains one epoch with the demo's
hyperparameters, in each of its configurations asked for. In its "same" layout it gets tunesmith's
own packed rows and batch order (with the demo's settings), so that the two tools' losses can be
compared step for step.

Every ``--eval-every`` optimizer steps each side's validation loss is scored by the same function
(mean loss over completion tokens, float32, no gradients) on the same validation examples, with the
clock stopped (``harness.Clock``). The target is the lowest validation loss any TRL configuration
reaches (or ``--target``). A side's time to quality is its training seconds at its first evaluation
at or below the target; TRL's is its fastest configuration's. tunesmith may train with settings of
its own (more epochs, other batch sizes or learning rates: ``--tunesmith-set``); ``--grid`` runs the
small grid ``TUNESMITH_GRID`` and keeps the setting that reaches the target first, chosen on this
validation loss only (the test split is never read).

Each run is a child process of its own, so its peak resident memory (ru_maxrss, from wait4) is its
own; tokens/s counts every non-padding token (prompt and completion) over the training seconds
alone (no model loading, no data preparation, no validation). TRL is a benchmark-only dependency:
`pip install -e ".[bench]"`.

The last line reads: ``time-to-quality Nx  memory Mx  tokens/s Sx  val_loss tunesmith A trl B  target T``
(time-to-quality: TRL's training seconds to the target over tunesmith's; memory: tunesmith's peak
RSS over that TRL configuration's; tokens/s: tunesmith's over that configuration's; val_loss: the
lowest each reached).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

from harness import (DEMO, Clock, demo_encoded, fastest, lora_model, machine, measure, packed_batches, plot_curves,
                     quality_options, serve_child, steady_rate, time_to_quality, trl_evaluations)

# TRL configurations: name -> SFTConfig options. "bfd" packs examples into rows of max_length
# (best-fit decreasing) and runs padding-free (position ids, no attention mask); "padding_free"
# flattens each batch into one sequence without packing it first; "grouped" pads batches of similar
# length (transformers' LengthGroupedSampler); "padded" pads random batches. Each in float32, with
# bf16 autocast ("-bf16", SFTConfig's default where the hardware has bf16), or with the frozen base
# weights stored in bf16 ("-bf16w", the adapter staying float32 as PEFT keeps it). Gradient
# checkpointing, which SFTConfig turns on by default, is off: it only costs time at these sizes.
#
# "same" is TRL's padding-free layout fed tunesmith's own packed rows, batches and batch order (and
# seq_lengths, from which TRL's collator builds per-example position ids): both tools then take the
# same optimizer steps on the same tokens, so their validation losses differ only by arithmetic.
TRL_LAYOUTS = {
    "same": {"padding_free": True},
    "bfd": {"packing": True, "packing_strategy": "bfd"},
    "padding_free": {"padding_free": True},
    "grouped": {"train_sampling_strategy": "group_by_length"},
    "padded": {},
}
TRL_VARIANTS = [f"{layout}{suffix}" for layout in TRL_LAYOUTS for suffix in ("", "-bf16", "-bf16w")]
# By default TRL runs as fast as this hardware lets it: under bf16 autocast where bf16 matmuls are
# native, in float32 where they are not (there autocast only emulates bf16, and slows TRL down).
TRL_DEFAULT = {True: ["same-bf16", "bfd-bf16"], False: ["same", "grouped"]}
# tunesmith's candidate settings for --grid (each with --tunesmith-set on top): name -> overrides of
# the demo config. Smaller batches take more steps per epoch; a second epoch continues where one
# epoch's cosine schedule would have ended.
TUNESMITH_GRID = {
    "demo": [],
    "2 epochs": ["train.epochs=2"],
    "batch 1024": ["train.batch_tokens=1024"],
    "batch 1024, 2 epochs": ["train.batch_tokens=1024", "train.epochs=2"],
}


def parse_args(argv=None) -> argparse.Namespace:
    import torch

    from tunesmith.train.precision import native_bf16

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-examples", type=int, default=600)
    p.add_argument("--val-examples", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=None,
                   help="Cap on optimizer steps (both sides); default one epoch for TRL and the demo's settings.")
    p.add_argument("--quick", action="store_true", help="Smoke run: 48 training and 16 validation examples.")
    default = TRL_DEFAULT[native_bf16(torch.device("cpu"))]
    p.add_argument("--trl", nargs="+", default=default, choices=TRL_VARIANTS, metavar="VARIANT",
                   help=f"TRL configuration(s); tunesmith is compared with the one that reaches the target first. "
                        f"Default here: {' '.join(default)}; all: {', '.join(TRL_VARIANTS)}.")
    p.add_argument("--sweep-trl", action="store_true", help="Run every TRL configuration.")
    p.add_argument("--only", choices=["tunesmith", "trl"], help="Run one side only.")
    quality_options(p, every=2, grid="; ".join(TUNESMITH_GRID))
    args = p.parse_args(argv)
    if args.quick:
        args.train_examples, args.val_examples = 48, 16
    return args


# ---------------------------------------------------------------------------------------------------
# Parent: prepare the examples once, run each side in a child, compare.


def prepare_spec(args) -> dict:
    """Tokenise the demo data with tunesmith's pipeline: what both children need."""
    from tunesmith.config import load_config
    from tunesmith.model import load_tokenizer, resolve_model

    config = load_config(DEMO, args.overrides)
    source = resolve_model(config.model.name)
    tokenizer = load_tokenizer(source)
    encoded = demo_encoded(config)
    train = encoded["train"][: args.train_examples]
    validation = encoded["validation"][: args.val_examples]  # never the test split: settings are chosen on it
    t = config.train
    return {
        "model": source,
        "overrides": args.overrides,
        "method": config.method.model_dump(),
        "pad_id": tokenizer.pad_token_id,
        "max_length": config.data.max_length,
        "batch_tokens": max(t.batch_tokens, config.data.max_length),
        "lr": t.lr, "weight_decay": t.weight_decay, "warmup_ratio": t.warmup_ratio, "scheduler": t.scheduler,
        "max_grad_norm": t.max_grad_norm, "seed": t.seed, "max_steps": args.max_steps,
        "eval_every": args.eval_every, "train": train, "validation": validation,
    }


def show(name: str, r: dict) -> str:
    curve = "  ".join(f"{p['step']}:{p['seconds']:.0f}s/{p['val_loss']:.4f}" for p in r["curve"])
    return (f"{name:<32} {r['tokens_per_s']:>5.0f} tok/s ({r['steady_tokens_per_s']:>4.0f} steady, first step "
            f"{r['first_step_s']:>4.1f} s)  {r['train_s']:>6.1f} s  {r['steps']:>3} steps  "
            f"peak RSS {r['peak_rss_mb']:>5.0f} MB\n    val_loss (step:seconds/loss) {curve}")


def main(argv=None) -> None:
    if serve_child(CHILDREN):
        return
    args = parse_args(argv)
    print(f"machine: {machine()}")
    spec = prepare_spec(args)
    print(f"{len(spec['train'])} training examples, {len(spec['validation'])} validation examples; "
          f"overrides (both sides): {' '.join(args.overrides) or 'none'}")
    trl = {}
    if args.only != "tunesmith":
        for variant in TRL_VARIANTS if args.sweep_trl else args.trl:
            trl[f"trl {variant}"] = measure(__file__, "trl", {**spec, "variant": variant})
            print(show(f"trl {variant}", trl[f"trl {variant}"]), flush=True)
    target = args.target
    if target is None and trl:
        target = min(p["val_loss"] for r in trl.values() for p in r["curve"] if p["step"] > 0)  # once trained
    ours = {}
    if args.only != "trl":
        grid = TUNESMITH_GRID if args.grid else {" ".join(args.settings) or "demo": []}
        for name, settings in grid.items():
            ours[f"tunesmith: {name}"] = measure(__file__, "tunesmith", {**spec, "settings": settings + args.settings})
            print(show(f"tunesmith: {name}", ours[f"tunesmith: {name}"]), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    mine = fastest(ours, "val_loss", target, higher=False) if ours else None
    theirs = fastest(trl, "val_loss", target, higher=False) if trl else None
    if args.plot:
        title = f"tunesmith vs TRL SFTTrainer, LoRA on SmolLM2-135M; {machine().split(', torch')[0]}"
        curves = {name + (" (chosen)" if name in (mine, theirs) else ""): r["curve"]
                  for name, r in {**ours, **trl}.items()}
        plot_curves(args.plot, curves, "val_loss", target, title, log=True)
    if not (ours and trl):
        return
    print(f"target {target:.4f}; tunesmith's setting reaching it first: {mine}; TRL's configuration: {theirs}")
    ratio = time_to_quality({"tunesmith": ours[mine]["curve"], "trl": trl[theirs]["curve"]}, "val_loss", target,
                            higher=False)
    a, b = ours[mine], trl[theirs]
    print(f"time-to-quality {ratio}  memory {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x  "
          f"tokens/s {a['tokens_per_s'] / b['tokens_per_s']:.2f}x  "
          f"val_loss tunesmith {a['val_loss']:.4f} trl {b['val_loss']:.4f}  target {target:.4f}")


# ---------------------------------------------------------------------------------------------------
# Children: one fine-tune each, in its own process.


def _lora_model(spec: dict, dtype: str):
    return lora_model(spec["model"], dtype, spec["method"], spec["seed"])


def _val_loss(model, spec: dict) -> dict:
    import torch

    # Shared prefixes: the same loss as each example alone (tests/test_shared_prefix.py), in about half the tokens.
    batches = packed_batches(spec["validation"], spec["batch_tokens"], spec["max_length"], 0, spec["pad_id"],
                             shared_prefix=True)
    with torch.no_grad():
        return {"val_loss": batches.mean_loss(model, spec["validation"])}


def _result(tokens: int, clock: Clock, marks: list[tuple[float, int]]) -> dict:
    """Whole-run and steady figures over the training seconds (see ``harness.steady_rate``), and the curve."""
    return {"tokens": tokens, "train_s": clock.spent, "tokens_per_s": tokens / clock.spent, "steps": len(marks),
            "first_step_s": marks[0][0], "steady_tokens_per_s": steady_rate(marks), "curve": clock.curve,
            "val_loss": min(p["val_loss"] for p in clock.curve)}


def child_tunesmith(spec: dict) -> dict:
    """tunesmith's own loop, configured as the demo config says (one epoch), plus its own ``settings``."""
    from accelerate import Accelerator

    from tunesmith.config import load_config
    from tunesmith.train.loop import fit
    from tunesmith.train.processes import setup_threads

    length = [f"train.max_steps={spec['max_steps'] or 'null'}", "train.epochs=1"]
    config = load_config(DEMO, [*spec["overrides"], *length, *spec["settings"]])
    cfg = config.train.model_copy(update={"eval_max_examples": None, "save_every": 10**9, "patience": None})
    setup_threads(cfg.threads)
    model = _lora_model(spec, config.model.dtype)
    batches = packed_batches(spec["train"], max(cfg.batch_tokens, spec["max_length"]), spec["max_length"], cfg.seed,
                             spec["pad_id"], cfg.packing, cfg.shared_prefix)
    marks = []
    clock = Clock(lambda m: _val_loss(m, spec), "val_loss")
    clock.evaluate(model, 0)

    def on_step(state) -> None:
        marks.append((clock.seconds(), state.input_tokens))
        if state.step % spec["eval_every"] == 0:
            clock.evaluate(model, state.step)

    with tempfile.TemporaryDirectory() as run_dir:
        state = fit(model, Accelerator(cpu=True), batches, [], cfg, Path(run_dir), on_step=on_step)
    clock.finish(model, state.step)
    return _result(state.input_tokens, clock, marks)


def child_trl(spec: dict) -> dict:
    """TRL's SFTTrainer on the same tokenised examples (their labels carry the completion-only mask)."""
    import logging

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunesmith.model import load_tokenizer
    from tunesmith.data.batching import plan_batches

    logging.getLogger("transformers").setLevel(logging.ERROR)
    layout, _, precision = spec["variant"].partition("-")
    train = spec["train"]
    # The same number of optimizer steps as tunesmith's packed plan: as many rows per batch for
    # packed layouts, as many examples per batch (on average) for the others.
    n_batches = len(plan_batches(train, spec["batch_tokens"], spec["max_length"], seed=0))
    per_batch = (spec["batch_tokens"] // spec["max_length"] if layout in ("bfd", "same")
                 else math.ceil(len(train) / n_batches))
    warmup = int(spec["warmup_ratio"] * (spec["max_steps"] or n_batches))  # tunesmith's rounding
    options = {"max_length": spec["max_length"], **TRL_LAYOUTS[layout]}
    if layout in ("padding_free", "same"):
        options["max_length"] = None  # the examples are already cut to max_length; TRL insists
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=True, seed=spec["seed"], data_seed=spec["seed"],
        num_train_epochs=1, max_steps=spec["max_steps"] or -1, per_device_train_batch_size=per_batch,
        gradient_accumulation_steps=1, learning_rate=spec["lr"], weight_decay=spec["weight_decay"],
        lr_scheduler_type=spec["scheduler"], warmup_steps=warmup, max_grad_norm=spec["max_grad_norm"] or 0.0,
        optim="adamw_torch", bf16=precision == "bf16", gradient_checkpointing=False,
        completion_only_loss=True, eval_strategy="no", save_strategy="no",
        logging_steps=10**6, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        **options,
    )
    if layout == "same":
        dataset = Dataset.from_dict(_same_rows(spec, per_batch))
    else:
        dataset = Dataset.from_dict({"input_ids": [e["input_ids"] for e in train],
                                     "labels": [e["labels"] for e in train]})
    model = _lora_model(spec, "bfloat16" if precision == "bf16w" else "float32")
    marks = []

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # SFTTrainer's count of non-padding tokens so far (its num_tokens metric)
            marks.append((clock.seconds(), trainer._total_train_tokens))

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):  # the rows are already in tunesmith's order
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    trainer = (InOrder if layout == "same" else SFTTrainer)(
        model=model, args=args, train_dataset=dataset, processing_class=load_tokenizer(spec["model"]),
        callbacks=[Marks()])
    clock = Clock(lambda m: _val_loss(m, spec), "val_loss")
    trainer.add_callback(trl_evaluations(clock, spec["eval_every"]))
    clock.evaluate(trainer.model, 0)
    trainer.train()
    clock.finish(trainer.model, trainer.state.global_step)
    return _result(trainer._total_train_tokens, clock, marks)


def _same_rows(spec: dict, per_batch: int) -> dict[str, list]:
    """tunesmith's first-epoch packed rows, in its batch order, as TRL dataset columns."""
    from tunesmith.config import load_config

    train = spec["train"]
    seed = load_config(DEMO, spec["overrides"]).train.seed
    batches = packed_batches(train, spec["batch_tokens"], spec["max_length"], seed, spec["pad_id"]).epoch(0)
    assert all(len(rows) == per_batch for rows in batches[:-1]), "unequal batches: TRL would regroup the rows"
    rows = [row for rows in batches for row in rows]
    return {"input_ids": [[t for i in row for t in train[i]["input_ids"]] for row in rows],
            "labels": [[t for i in row for t in train[i]["labels"]] for row in rows],
            "seq_lengths": [[len(train[i]["input_ids"]) for i in row] for row in rows]}


CHILDREN = {"tunesmith": child_tunesmith, "trl": child_trl}


if __name__ == "__main__":
    main()
