"""Profile one LoRA training step on the demo data: where the time goes, and proof that the output
projection runs only on labelled tokens, in chunks.

    python benchmarks/profile_step.py                  # tunesmith's step (label-only head)
    python benchmarks/profile_step.py --full-logits    # the same step through the model's own forward

Prints the batch, every call of the output projection (a matmul with the [vocab x hidden] weight)
with its input shape and the memory it allocated, the largest single tensor the step created, and
the operators that took the most time. One warm-up step runs first, unprofiled.
"""

from __future__ import annotations

import argparse
import contextlib
import time

from harness import DEMO, demo_encoded, lora_model, machine


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full-logits", action="store_true", help="Logits for every position (direct=False).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rows", type=int, default=16, help="Rows of data.max_length tokens in the batch.")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from tunesmith.config import load_config
    from tunesmith.data.format import IGNORE
    from tunesmith.data.batching import collate, plan_batches
    from tunesmith.model import load_tokenizer, resolve_model
    from tunesmith.objectives.lm_loss import loss_sum
    from tunesmith.train.loop import apply_speed_options

    config = load_config(DEMO, args.overrides)
    print(f"machine: {machine()}")
    source = resolve_model(config.model.name)
    tokenizer = load_tokenizer(source)
    examples = demo_encoded(config)["train"][:2000]
    row_len = config.data.max_length
    plan = plan_batches(examples, args.rows * row_len, row_len, seed=0, one_per_row=not config.train.packing)
    model = lora_model(source, config.model.dtype, config.method.model_dump(), config.train.seed)
    apply_speed_options(model, config.train)
    model.train()
    vocab, hidden = model.get_output_embeddings().weight.shape
    direct = not args.full_logits
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if config.train.mixed_precision == "bf16"
                else contextlib.nullcontext())

    def step(batch):
        with autocast:
            s, n = loss_sum(model, batch, direct)
        (s / n).backward()
        model.zero_grad(set_to_none=True)

    step(collate(examples, plan[0], row_len, tokenizer.pad_token_id))
    batch = collate(examples, plan[1], row_len, tokenizer.pad_token_id)
    tokens = int((batch["seq_ids"] >= 0).sum())
    labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    print(f"batch {tuple(batch['input_ids'].shape)}: {tokens} tokens, {labelled} labelled; "
          f"output projection weight [{vocab} x {hidden}]; {'full logits' if args.full_logits else 'label-only'}")

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True) as prof:
        started = time.perf_counter()
        step(batch)
        seconds = time.perf_counter() - started
    print(f"step: {seconds:.2f} s, {tokens / seconds:.0f} tokens/s\n")

    print("output projection calls (matmuls with the vocabulary weight):")
    head_flops = 0
    for e in prof.events():
        if e.name in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear") and e.input_shapes:
            shapes = [s for s in e.input_shapes if s]
            if any(vocab in s for s in shapes) and e.name == "aten::mm":
                a, b = shapes[0], shapes[1]
                head_flops += 2 * a[0] * a[1] * b[-1]
                print(f"  {e.name} {a} x {b}  {e.cpu_memory_usage / 2**20:8.1f} MB allocated")
    full = 2 * tokens * hidden * vocab
    print(f"  {head_flops / 1e9:.2f} GFLOP in the head; one forward over every token would be {full / 1e9:.2f}\n")

    largest = max((e for e in prof.events() if e.cpu_memory_usage > 0), key=lambda e: e.cpu_memory_usage)
    print(f"largest single allocation: {largest.cpu_memory_usage / 2**20:.1f} MB by {largest.name} "
          f"{[s for s in largest.input_shapes if s]}\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top,
                                    max_name_column_width=50))


if __name__ == "__main__":
    main()
