"""Shared-prefix packing against plain packing: the demo's LoRA training steps, interleaved in one
process so that both see the same machine (a shared VM's speed drifts by tens of percent within
minutes).

    python benchmarks/shared_prefix.py              # 3 rounds of 4 steps each way (~5 min, 2 cores)
    python benchmarks/shared_prefix.py --rounds 5

Both train the same LoRA adapter of SmolLM2-135M on the same demo examples, with the demo's
``train.batch_tokens``: a step computes about the same number of row tokens either way, and the
shared-prefix step covers more examples. Reported per layout: examples/s and tokens/s (the examples'
own tokens, prefix included, so both figures count the same work), median over rounds of the steps
after each round's first. The last line reads: ``shared prefix X.XXx examples/s (prefix N tokens)``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from harness import DEMO, demo_encoded, lora_model, machine, packed_batches


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="Optimizer steps per layout per round (the first is dropped).")
    p.add_argument("--examples", type=int, default=2000, help="Training examples the batches are drawn from.")
    return p.parse_args(argv)


def run_steps(model, batches, cfg, steps: int) -> tuple[float, int, int]:
    """Seconds, examples and tokens of ``steps - 1`` steps, after a first one."""
    from accelerate import Accelerator

    from tunesmith.train.loop import fit

    marks = []
    with tempfile.TemporaryDirectory() as run_dir:
        fit(model, Accelerator(cpu=True), batches, [], cfg.model_copy(update={"max_steps": steps}), Path(run_dir),
            on_step=lambda state: marks.append((time.perf_counter(), state.input_tokens, state.micro_in_epoch)))
    plan = batches.epoch(0)
    examples = sum(len(row) for micro in plan[1:steps] for row in micro)
    return marks[-1][0] - marks[0][0], examples, marks[-1][1] - marks[0][1]


def main(argv=None) -> None:
    import torch

    from tunesmith.config import load_config
    from tunesmith.data.batching import shared_prefix
    from tunesmith.model import load_tokenizer, resolve_model
    from tunesmith.train.precision import uses_bf16

    args = parse_args(argv)
    print(f"machine: {machine()}")
    config = load_config(DEMO)
    cfg = config.train.model_copy(update={"save_every": 10**9, "warmup_ratio": 0.0, "grad_accum": 1})
    source = resolve_model(config.model.name)
    pad = load_tokenizer(source).pad_token_id
    examples = demo_encoded(config)["train"][: args.examples]
    prefix = shared_prefix(examples)
    print(f"{len(examples)} examples; shared prefix {prefix} tokens; batch_tokens {cfg.batch_tokens}, rows of "
          f"{config.data.max_length}; bf16 autocast: {uses_bf16(cfg.mixed_precision, torch.device('cpu'))}")
    rates = {False: [], True: []}
    for round_ in range(args.rounds):
        for shared in (False, True):
            model = lora_model(source, config.model.dtype, config.method.model_dump(), cfg.seed)
            batches = packed_batches(examples, cfg.batch_tokens, config.data.max_length, cfg.seed, pad,
                                     shared_prefix=shared)
            seconds, n_examples, tokens = run_steps(model, batches, cfg, args.steps)
            rates[shared].append((n_examples / seconds, tokens / seconds))
            print(f"round {round_ + 1} {'shared' if shared else 'plain '}: {n_examples / seconds:6.2f} examples/s "
                  f"{tokens / seconds:6.0f} tokens/s", flush=True)
    plain, shared = (statistics.median(r[0] for r in rates[k]) for k in (False, True))
    for name, key in (("plain", False), ("shared", True)):
        print(f"{name:<7} median {statistics.median(r[0] for r in rates[key]):6.2f} examples/s "
              f"{statistics.median(r[1] for r in rates[key]):6.0f} tokens/s")
    print(f"shared prefix {shared / plain:.2f}x examples/s (prefix {prefix} tokens)")


if __name__ == "__main__":
    main()
