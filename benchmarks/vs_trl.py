"""tunesmith against TRL's SFTTrainer: the same LoRA fine-tune, timed and validated side by side.

    python benchmarks/vs_trl.py                  # 600 training / 100 validation examples (~12 min, 2 cores)
    python benchmarks/vs_trl.py --trl same-bf16 grouped-bf16     # the bf16-CPU run in docs/performance.md
    python benchmarks/vs_trl.py --quick          # smoke run: 48 / 16 examples
    python benchmarks/vs_trl.py --only tunesmith --set train.mixed_precision=no   # tunesmith alone

Both sides fine-tune the bundled SmolLM2-135M-Instruct on the demo data (examples/rotten_tomatoes_lora.yaml)
with the demo's hyperparameters: LoRA r=16 on every linear layer of the decoder, AdamW, cosine schedule,
one epoch. They get the same tokenised examples (tunesmith's data pipeline: chat template, loss on
the answer and its end-of-turn token only), the same initial adapter weights, the same number of
optimizer steps, and the same validation examples, scored by the same function (mean loss over
completion tokens, float32). In TRL's "same" layout they also get the same batches in the same order,
so validation losses are compared with that one; speed and memory with the fastest TRL layout run.

Each side runs in a child process of its own, so its peak resident memory (ru_maxrss, from wait4) is
its own; tokens/s counts every non-padding token (prompt and completion) over the wall time of the
training call alone (no model loading, no data preparation, no validation). TRL is a benchmark-only
dependency: `pip install -e ".[bench]"`.

The last line reads: ``speedup X.XXx  memory Y.YYx  val_loss tunesmith A.AAAA trl B.BBBB``
(speedup: tunesmith tokens/s over TRL's; memory: tunesmith peak RSS over TRL's).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

from harness import DEMO, demo_encoded, lora_model, machine, measure, packed_batches, serve_child, steady_rate

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


def parse_args(argv=None) -> argparse.Namespace:
    import torch

    from tunesmith.train.precision import native_bf16

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-examples", type=int, default=600)
    p.add_argument("--val-examples", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=None, help="Cap on optimizer steps (both sides); default one epoch.")
    p.add_argument("--quick", action="store_true", help="Smoke run: 48 training and 16 validation examples.")
    default = TRL_DEFAULT[native_bf16(torch.device("cpu"))]
    p.add_argument("--trl", nargs="+", default=default, choices=TRL_VARIANTS, metavar="VARIANT",
                   help=f"TRL configuration(s); speed and memory are compared with the fastest, validation loss "
                        f"with a 'same' one where run. Default here: {' '.join(default)}; all: {', '.join(TRL_VARIANTS)}.")
    p.add_argument("--sweep-trl", action="store_true", help="Time every TRL configuration; compare with the fastest.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override the demo config for tunesmith (e.g. train.packing=false); repeatable.")
    p.add_argument("--only", choices=["tunesmith", "trl"], help="Run one side only.")
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
    validation = encoded["validation"][: args.val_examples]
    if len(validation) < args.val_examples:  # the demo keeps 2% for validation: top up from test
        validation += encoded["test"][: args.val_examples - len(validation)]
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
        "train": train, "validation": validation,
    }


def show(name: str, r: dict) -> str:
    return (f"{name:<24} {r['tokens_per_s']:>5.0f} tok/s ({r['steady_tokens_per_s']:>4.0f} steady, first step "
            f"{r['first_step_s']:>4.1f} s)  {r['train_s']:>6.1f} s  {r['steps']:>3} steps  "
            f"peak RSS {r['peak_rss_mb']:>5.0f} MB  val_loss {r['val_loss']:.4f}")


def main(argv=None) -> None:
    if serve_child(CHILDREN):
        return
    args = parse_args(argv)
    print(f"machine: {machine()}")
    spec = prepare_spec(args)
    print(f"{len(spec['train'])} training examples, {len(spec['validation'])} validation examples; "
          f"tunesmith overrides: {' '.join(args.overrides) or 'none'}")
    results = {}
    if args.only != "trl":
        results["tunesmith"] = measure(__file__, "tunesmith", spec)
        print(show("tunesmith", results["tunesmith"]), flush=True)
    if args.only != "tunesmith":
        trl = {}
        for variant in TRL_VARIANTS if args.sweep_trl else args.trl:
            trl[variant] = measure(__file__, "trl", {**spec, "variant": variant})
            print(show(f"trl {variant}", trl[variant]), flush=True)
        best = max(trl, key=lambda v: trl[v]["tokens_per_s"])
        matched = next((v for v in trl if v.startswith("same")), best)
        results["trl"] = trl[best]
        results["trl_val_loss"] = trl[matched]["val_loss"]
        print(f"fastest TRL configuration: {best}; validation loss from: {matched}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if len(results) == 3:
        ours, theirs = results["tunesmith"], results["trl"]
        print(f"speedup {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x  "
              f"memory {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x  "
              f"val_loss tunesmith {ours['val_loss']:.4f} trl {results['trl_val_loss']:.4f}")


# ---------------------------------------------------------------------------------------------------
# Children: one fine-tune each, in its own process.


def _lora_model(spec: dict, dtype: str):
    return lora_model(spec["model"], dtype, spec["method"], spec["seed"])


def _val_loss(model, spec: dict) -> float:
    batches = packed_batches(spec["validation"], spec["batch_tokens"], spec["max_length"], 0, spec["pad_id"])
    return batches.mean_loss(model, spec["validation"])


def _result(tokens: int, started: float, ended: float, marks: list[tuple[float, int]], model, spec: dict) -> dict:
    """Whole-run and steady figures (see ``harness.steady_rate``)."""
    return {"tokens": tokens, "train_s": ended - started, "tokens_per_s": tokens / (ended - started),
            "steps": len(marks), "first_step_s": marks[0][0] - started, "steady_tokens_per_s": steady_rate(marks),
            "val_loss": _val_loss(model, spec)}


def child_tunesmith(spec: dict) -> dict:
    """tunesmith's own loop, configured as the demo config (plus --set overrides) says."""
    from accelerate import Accelerator

    from tunesmith.config import load_config
    from tunesmith.recipe import setup_threads
    from tunesmith.train.loop import fit

    config = load_config(DEMO, spec["overrides"])
    cfg = config.train.model_copy(update={"epochs": 1, "max_steps": spec["max_steps"], "eval_max_examples": None,
                                          "save_every": 10**9, "patience": None})
    setup_threads(cfg.threads)
    model = _lora_model(spec, config.model.dtype)
    batches = packed_batches(spec["train"], spec["batch_tokens"], spec["max_length"], cfg.seed, spec["pad_id"],
                             cfg.packing, cfg.shared_prefix)
    marks = []
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        state = fit(model, Accelerator(cpu=True), batches, [], cfg, Path(run_dir),
                      on_step=lambda st: marks.append((time.perf_counter(), st.input_tokens)))
        ended = time.perf_counter()
    return _result(state.input_tokens, started, ended, marks, model, spec)


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
            marks.append((time.perf_counter(), trainer._total_train_tokens))

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):  # the rows are already in tunesmith's order
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    trainer = (InOrder if layout == "same" else SFTTrainer)(
        model=model, args=args, train_dataset=dataset, processing_class=load_tokenizer(spec["model"]),
        callbacks=[Marks()])
    started = time.perf_counter()
    trainer.train()
    ended = time.perf_counter()
    return _result(trainer._total_train_tokens, started, ended, marks, trainer.model, spec)


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
