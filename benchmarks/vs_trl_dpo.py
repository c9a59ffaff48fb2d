"""tunesmith against TRL's DPOTrainer: the same DPO job with LoRA, timed and scored side by side.

    python benchmarks/vs_trl_dpo.py                         # 64 pairs, 16 optimizer steps
    python benchmarks/vs_trl_dpo.py --pairs 4 --steps 2     # smoke run

Both sides train the bundled SmolLM2-135M-Instruct with the settings of
examples/rotten_tomatoes_dpo.yaml (LoRA r=16 on every linear layer, sigmoid loss, beta, learning
rate), on the same pairs of builtin:rotten_tomatoes_pairs, from the same initial adapter weights,
for the same number of optimizer steps with the same number of pairs per step. Their reference is
the policy with its adapter disabled. TRL is given the pairs in its conversational form, so it
renders them with the same chat template. Afterwards both tuned models are scored by the same
function (tunesmith's: DPO loss and reward accuracy on the held-out pairs, float32).

Each side runs in a child process of its own (``harness.measure``), so its peak resident memory is
its own; pairs/s counts the pairs trained over the wall time of the training call alone. TRL is a
benchmark-only dependency: `pip install -e ".[bench]"`.

The last line reads: ``speedup X.XXx  memory Y.YYx  loss tunesmith A.AAAA trl B.BBBB  accuracy
tunesmith C.CC trl D.DD`` (speedup: tunesmith's pairs/s over TRL's; memory: tunesmith's peak RSS
over TRL's).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from harness import ROOT, lora_model, machine, measure, serve_child

CONFIG = ROOT / "examples" / "rotten_tomatoes_dpo.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=64, help="training pairs")
    p.add_argument("--eval-pairs", type=int, default=15, help="held-out pairs scored after training")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps (both sides)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the example config (e.g. train.batch_tokens=1024); repeatable")
    return p.parse_args(argv)


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

    held_out = data.encoded["test"] + data.encoded["validation"]
    return {"model": session.model_source, "method": config.method.model_dump(), "objective": config.objective.model_dump(),
            "pad_id": session.tokenizer.pad_token_id, "max_length": config.data.max_length,
            "batch_tokens": session.layout.batch_tokens, "lr": t.lr, "weight_decay": t.weight_decay,
            "max_grad_norm": t.max_grad_norm, "seed": t.seed, "steps": args.steps, "overrides": args.overrides,
            "items": data.encoded["train"][: args.pairs],
            "texts": [conversational(e) for e in data.examples["train"][: args.pairs]],
            "held_out": held_out[: args.eval_pairs]}


def step_plan(spec: dict) -> list[list[int]]:
    """tunesmith's micro-batches (one per optimizer step) for the run's steps, epoch after epoch."""
    batches = _batches(spec, spec["items"])
    plan, epoch = [], 0
    while len(plan) < spec["steps"]:
        plan += batches.epoch(epoch)
        epoch += 1
    return plan[: spec["steps"]]


def _batches(spec: dict, items: list[dict]):
    from tunesmith.objectives.base import Layout
    from tunesmith.objectives.dpo import Options, PairBatches

    layout = Layout(spec["batch_tokens"], spec["max_length"], spec["pad_id"], spec["seed"])
    return PairBatches(items, layout, reference=None, options=Options(**spec["objective"]))


def _scored(model, spec: dict) -> dict:
    figures = _batches(spec, spec["held_out"]).figures(model, spec["held_out"])
    return {"loss": figures["loss"], "accuracy": figures["accuracy"]}


def main(argv=None) -> None:
    if serve_child(CHILDREN):
        return
    args = parse_args(argv)
    print(f"machine: {machine()}")
    spec = prepare_spec(args)
    plan = step_plan(spec)
    print(f"{len(spec['items'])} training pairs, {args.steps} steps of {sum(map(len, plan)) / len(plan):.1f} pairs "
          f"on average, {len(spec['held_out'])} held-out pairs")
    results = {}
    for side in ("tunesmith", "trl"):
        r = results[side] = measure(__file__, side, spec)
        print(f"{side:<10} {r['pairs_per_s']:6.2f} pairs/s  {r['train_s']:7.1f} s  peak RSS {r['peak_rss_mb']:6.0f} MB  "
              f"held-out loss {r['loss']:.4f}  reward accuracy {r['accuracy']:.2f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    ours, theirs = results["tunesmith"], results["trl"]
    print(f"speedup {ours['pairs_per_s'] / theirs['pairs_per_s']:.2f}x  memory {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x  "
          f"loss tunesmith {ours['loss']:.4f} trl {theirs['loss']:.4f}  "
          f"accuracy tunesmith {ours['accuracy']:.2f} trl {theirs['accuracy']:.2f}")


def child_tunesmith(spec: dict) -> dict:
    """tunesmith's own loop, one micro-batch per optimizer step, as the example config says."""
    from accelerate import Accelerator

    from tunesmith.config import load_config
    from tunesmith.recipe import setup_threads
    from tunesmith.train.loop import fit

    config = load_config(CONFIG, spec["overrides"])
    cfg = config.train.model_copy(update={"epochs": 10**6, "max_steps": spec["steps"], "grad_accum": 1,
                                          "eval_max_examples": None, "save_every": 10**9, "patience": None})
    setup_threads(cfg.threads)
    model = lora_model(spec["model"], config.model.dtype, spec["method"], spec["seed"])
    batches = _batches(spec, spec["items"])
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        fit(model, Accelerator(cpu=True), batches, [], cfg, Path(run_dir))
        seconds = time.perf_counter() - started
    pairs = sum(map(len, step_plan(spec)))
    return {"train_s": seconds, "pairs_per_s": pairs / seconds, **_scored(model, spec)}


def child_trl(spec: dict) -> dict:
    """TRL's DPOTrainer on the same pairs, with as many pairs per step as tunesmith's plan on average."""
    import logging
    import math

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tunesmith.model import load_tokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    plan = step_plan(spec)
    per_step = math.ceil(sum(map(len, plan)) / len(plan))
    objective = spec["objective"]
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=True, seed=spec["seed"], data_seed=spec["seed"],
        max_steps=spec["steps"], per_device_train_batch_size=per_step, gradient_accumulation_steps=1,
        learning_rate=spec["lr"], weight_decay=spec["weight_decay"], max_grad_norm=spec["max_grad_norm"] or 0.0,
        optim="adamw_torch", bf16=False, gradient_checkpointing=False, beta=objective["beta"],
        loss_type=[objective["loss"]], label_smoothing=objective["label_smoothing"], max_length=spec["max_length"],
        eval_strategy="no", save_strategy="no", logging_steps=10**6, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0)
    model = lora_model(spec["model"], "float32", spec["method"], spec["seed"])
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(spec["texts"]),
                         processing_class=load_tokenizer(spec["model"]))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {"train_s": seconds, "pairs_per_s": per_step * spec["steps"] / seconds, **_scored(trainer.model, spec)}


CHILDREN = {"tunesmith": child_tunesmith, "trl": child_trl}


if __name__ == "__main__":
    main()
