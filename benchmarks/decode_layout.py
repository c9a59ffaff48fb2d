"""Frozen linear weights stored column-major (``model.lay_out_for_decoding``) against the row-major
layout checkpoints load with, on the same model in one process.

    python benchmarks/decode_layout.py                      # SmolLM2-135M-Instruct, float32
    python benchmarks/decode_layout.py --rows 1,4,16 --repeats 3
    python benchmarks/decode_layout.py --dtype bfloat16     # bfloat16 weights: packed for oneDNN or plain

For each number of rows: the median time of a decode step (one new token per row, after a
``--prompt``-token prompt in the KV cache), the prompt's prefill, and a LoRA training step on
``--train-rows`` rows of the prompt's length (forward and backward; the base weights are frozen, so
their layout changes with the rest). Each figure is the best of ``--repeats`` rounds, the two
layouts alternating, so neither profits from running second. The logits of both layouts are
compared first: they must agree to float rounding. With ``--dtype bfloat16`` on a CPU where oneDNN
runs bfloat16, "column-major" is what ``lay_out_for_decoding`` does there: each weight packed for
oneDNN (``model.PackedLinear``); "row-major" is torch's plain bfloat16 layer.

The last line reads ``decode step at N rows: X.XXx faster  prefill Y.YYx  train step Z.ZZx``
(row-major time over column-major time, at the largest number of rows).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from harness import machine

from tunesmith.model import lay_out_for_decoding, load_model, resolve_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", default="1,4,16,32", help="rows per decode step, comma-separated")
    p.add_argument("--prompt", type=int, default=150, help="prompt tokens in the cache")
    p.add_argument("--steps", type=int, default=20, help="decode steps timed per round")
    p.add_argument("--train-rows", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    return p.parse_args(argv)


def row_major(model) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.__dict__.pop("forward", None)  # a packed layer's (PackedLinear) back to the plain one
                if not module.weight.is_contiguous():
                    module.weight.data = module.weight.data.contiguous()


@torch.no_grad()
def decode(model, rows: int, prompt: int, steps: int) -> tuple[float, float]:
    """(prefill seconds, median decode-step seconds)."""
    from transformers import DynamicCache

    ids = torch.randint(100, 1000, (rows, prompt), generator=torch.Generator().manual_seed(rows))
    cache = DynamicCache(config=model.config)
    started = time.perf_counter()
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - started
    token = ids[:, -1:]
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model(input_ids=token, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - started)
    return prefill, statistics.median(times)


def train_step(model, rows: int, prompt: int) -> float:
    ids = torch.randint(100, 1000, (rows, prompt), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main(argv=None) -> None:
    from peft import LoraConfig, get_peft_model

    args = parse_args(argv)
    torch.manual_seed(0)
    model = load_model(resolve_model(args.model)).to(getattr(torch, args.dtype)).eval()
    model.requires_grad_(False)
    print(f"model {args.model}, {args.dtype}; {machine()}")

    probe = torch.randint(100, 1000, (4, 32))
    with torch.no_grad():
        before = model(input_ids=probe).logits
        moved = lay_out_for_decoding(model)
        after = model(input_ids=probe).logits
        row_major(model)
    print(f"{moved} weights relaid; largest logit difference {float((before - after).abs().max()):.2e}")

    rows = [int(r) for r in args.rows.split(",")]
    best: dict[tuple, float] = {}
    for _ in range(args.repeats):
        for layout in ("row", "column"):
            if layout == "column":
                lay_out_for_decoding(model)
            for n in rows:
                prefill, step = decode(model, n, args.prompt, args.steps)
                for key, value in (("prefill", prefill), ("step", step)):
                    best[layout, key, n] = min(best.get((layout, key, n), float("inf")), value)
            row_major(model)

    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for _ in range(args.repeats):
        for layout in ("row", "column"):
            if layout == "column":
                lay_out_for_decoding(lora)
            train_step(lora, args.train_rows, args.prompt)  # warm
            seconds = train_step(lora, args.train_rows, args.prompt)
            best[layout, "train", 0] = min(best.get((layout, "train", 0), float("inf")), seconds)
            row_major(lora)

    print(f"\n| rows | decode step, row-major ms | column-major ms | ratio | prefill of {args.prompt}, "
          "row-major ms | column-major ms | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in rows:
        r, c = best["row", "step", n], best["column", "step", n]
        pr, pc = best["row", "prefill", n], best["column", "prefill", n]
        print(f"| {n} | {r * 1e3:.1f} | {c * 1e3:.1f} | {r / c:.2f}x | {pr * 1e3:.0f} | {pc * 1e3:.0f} | {pr / pc:.2f}x |")
    tr, tc = best["row", "train", 0], best["column", "train", 0]
    print(f"\nLoRA train step, {args.train_rows} rows of {args.prompt} tokens: row-major {tr:.2f} s, "
          f"column-major {tc:.2f} s ({tr / tc:.2f}x)")
    n = rows[-1]
    print(f"decode step at {n} rows: {best['row', 'step', n] / best['column', 'step', n]:.2f}x faster  "
          f"prefill {best['row', 'prefill', n] / best['column', 'prefill', n]:.2f}x  train step {tr / tc:.2f}x")


if __name__ == "__main__":
    main()
