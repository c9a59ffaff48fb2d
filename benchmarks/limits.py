"""How close tunesmith's training gets to this machine's limits, and how it scales.

    python benchmarks/limits.py            # ~15 min on 2 cores
    python benchmarks/limits.py --quick    # smoke run: smaller matmuls, fewer steps and sizes
    python benchmarks/limits.py --only peak --only roofline   # the machine's limits and the decode roofline

1. The matmul peak: the best of square matmuls, float32 and bfloat16, on all threads; and the memory
   bandwidth: the best of several reads (a sum) and copies of a tensor far larger than the caches.
2. Model-FLOPs utilisation of tunesmith's loop on the demo data, for full fine-tuning and LoRA: model
   FLOPs per token (formulas below, printed with their terms) times steady tokens/s, over the matmul
   peak of the precision the matmuls run in.
3. Scaling: tokens/s and peak memory against sequence length (synthetic examples of exactly that
   length, a quarter of each trained), and against data set size (demo-like lengths).

Model FLOPs per token (N = weights of the decoder's linear layers, L layers of width d, V the vocabulary,
c = mean causal context of a token, f = fraction of tokens with a label):

    full: 6 N + 12 L d c + 6 d V f
    LoRA: 4 N + 6 N_lora + 12 L d c + 4 d V f

6N is the standard count (forward 2N, backward 2N for the inputs' gradients and 2N for the weights');
frozen weights (LoRA's base) need no weight gradient, so 4N, and the adapters' own 6 N_lora. Attention
is 4 L d c forward (scores and weighted sum), twice that backward. The output projection counts only
for labelled tokens, since that is all tunesmith computes (a loop projecting every token would spend
d V more per token, forward, in each direction). Recomputation (activation checkpointing) is not
model FLOPs.

4. The decode roofline of the bundled model (``--model``): what one decoding step must do, and so the
   most tokens/s a batch of B rows can reach on this machine. Each step reads every weight the step
   multiplies by once (the decoder's linear layers N and the output projection d V; the input
   embedding is a lookup, one row a token) and each row's KV cache (2 L d_kv c elements at context c):

       bytes/step  = (N + d V) s + B 2 L d_kv c s        (s: bytes of an element, 4 float32, 2 bf16)
       FLOPs/token = 2 N + 2 d V + 4 L d c
       tokens/s   <= B / max(bytes/step / bandwidth, B FLOPs/token / matmul peak)

   ``benchmarks/serve_load.py`` prints each of its tokens/s figures as a share of this bound.

Steady tokens/s leaves out the first step: it allocates the process's memory, which on this machine
costs more than the step's compute. Each measurement runs in its own process (benchmarks/harness.py).
"""

from __future__ import annotations

import argparse
import os
import random
import time

from harness import DEMO, demo_encoded, lora_model, machine, measure, packed_batches, serve_child, steady_rate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Smoke run: smaller matmuls, fewer steps and sizes.")
    p.add_argument("--steps", type=int, default=3, help="Timed steps per measurement (after one warm-up step).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override the demo config (e.g. model.dtype=float32); repeatable.")
    p.add_argument("--model", default="smollm2-135m", help="The model of the decode roofline.")
    p.add_argument("--only", choices=["peak", "mfu", "length", "size", "roofline"], action="append",
                   help="Run only these parts; repeatable.")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 1
    return args


# ---------------------------------------------------------------------------------------------------
# Matmul peak.


def matmul_peak(sizes: list[int], seconds: float = 1.0) -> dict[str, float]:
    """Best GFLOP/s of square matmuls per dtype."""
    import torch

    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        rates = []
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                a @ b
                count += 1
            rates.append(2 * n**3 * count / (time.perf_counter() - started) / 1e9)
        best[str(dtype).removeprefix("torch.")] = max(rates)
    return best


def memory_bandwidth(megabytes: int = 512, runs: int = 5) -> dict[str, float]:
    """GB/s of reading (a sum) and of copying (read and write counted) a float32 tensor of ``megabytes``,
    far beyond the caches: the best of ``runs`` each, and the median."""
    import statistics

    import torch

    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    size = src.numel() * 4
    found = {}
    for name, work, moved in (("read", lambda: src.sum(), size), ("copy", lambda: dst.copy_(src), 2 * size)):
        work()  # the first touch of dst pays for its pages
        rates = []
        for _ in range(runs):
            started = time.perf_counter()
            work()
            rates.append(moved / (time.perf_counter() - started) / 1e9)
        found[name], found[f"{name}_median"] = max(rates), statistics.median(rates)
    return found


def decode_terms(model_name: str) -> dict[str, int]:
    """The sizes of the decode roofline (module docstring) of ``model_name``, from its config and its
    weights: N, d, V, L, d_kv (the width of one token's keys, or values, in one layer)."""
    import torch

    from tunesmith.model import load_model, resolve_model, unwrap

    inner = unwrap(load_model(resolve_model(model_name)))
    config = inner.config.get_text_config()
    layers = getattr(inner, inner.base_model_prefix).layers
    n = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    head = _head_dim(config)
    return {"N": n, "d": config.hidden_size, "V": config.vocab_size, "L": config.num_hidden_layers,
            "d_kv": head * getattr(config, "num_key_value_heads", config.num_attention_heads)}


def decode_roofline(terms: dict[str, int], rows: int, context: float, bandwidth_gb_s: float, peak_gflop_s: float,
                    element_bytes: int) -> dict[str, float]:
    """The most tokens/s that ``rows`` rows decoding at mean ``context`` can reach, and what bounds it."""
    n, d, v, layers, d_kv = terms["N"], terms["d"], terms["V"], terms["L"], terms["d_kv"]
    step_bytes = (n + d * v) * element_bytes + rows * 2 * layers * d_kv * context * element_bytes
    flops = 2 * n + 2 * d * v + 4 * layers * d * context
    memory_s, compute_s = step_bytes / (bandwidth_gb_s * 1e9), rows * flops / (peak_gflop_s * 1e9)
    return {"tokens_per_s": rows / max(memory_s, compute_s), "bytes_per_step": step_bytes,
            "flops_per_token": flops, "bound": "memory" if memory_s >= compute_s else "compute"}


def print_roofline(terms: dict[str, int], bandwidth: dict[str, float], peak: dict[str, float],
                   rows: list[int], context: float) -> None:
    t = terms
    print(f"\n## decode roofline (N={t['N'] / 1e6:.1f}M d={t['d']} V={t['V']} L={t['L']} d_kv={t['d_kv']}, "
          f"context {context:g}; read bandwidth {bandwidth['read']:.1f} GB/s)")
    print(f"{'weights':<9} {'rows':>4} {'MB/step':>8} {'GFLOP/token':>12} {'tokens/s':>9}  bound")
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        for b in rows:
            r = decode_roofline(terms, b, context, bandwidth["read"], peak[dtype], size)
            print(f"{dtype:<9} {b:>4} {r['bytes_per_step'] / 1e6:>8.1f} {r['flops_per_token'] / 1e9:>12.3f} "
                  f"{r['tokens_per_s']:>9.1f}  {r['bound']}")


# ---------------------------------------------------------------------------------------------------
# Training measurements (children).


def _synthetic(n: int, length: int | None, vocab: int, seed: int) -> list[dict]:
    """Examples of exactly ``length`` tokens (or demo-like lengths), the last quarter trained."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        size = length or max(16, int(rng.gauss(62, 10)))
        ids = [rng.randrange(3, vocab) for _ in range(size)]
        prompt = size - max(1, size // 4)
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def flops_per_token(model, examples: list[dict], lora: bool) -> tuple[float, dict]:
    """Model FLOPs per token of a training step (see the module docstring) and its terms."""
    import torch

    from tunesmith.model import unwrap

    inner = unwrap(model)
    config = inner.config.get_text_config()
    layers = getattr(inner, inner.base_model_prefix).layers
    # PEFT's lora_A / lora_B are Linear modules too: they are N_lora.
    n = sum(m.weight.numel() for name, m in layers.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in name)
    n_lora = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad) if lora else 0
    L, d, V = config.num_hidden_layers, config.num_attention_heads * _head_dim(config), config.vocab_size
    tokens = sum(len(e["input_ids"]) for e in examples)
    context = sum(len(e["input_ids"]) * (len(e["input_ids"]) + 1) / 2 for e in examples) / tokens
    labelled = sum(sum(t != -100 for t in e["labels"][1:]) for e in examples) / tokens
    attention = 12 * L * d * context
    if lora:
        total = 4 * n + 6 * n_lora + attention + 4 * d * V * labelled
    else:
        total = 6 * n + attention + 6 * d * V * labelled
    return total, {"N": n, "N_lora": n_lora, "L": L, "d": d, "V": V, "c": context, "f": labelled}


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def child_train(payload: dict) -> dict:
    """A few optimizer steps of tunesmith's loop; steady tokens/s from the second step on."""
    import tempfile
    from pathlib import Path

    import torch
    from accelerate import Accelerator

    from tunesmith.config import load_config, read_config_file, with_method
    from tunesmith.model import load_tokenizer, resolve_model
    from tunesmith.train.loop import fit
    from tunesmith.train.precision import uses_bf16
    from tunesmith.train.processes import setup_threads

    # The demo's method options that the measured method takes (full takes none of LoRA's).
    config = load_config(DEMO, payload["overrides"], raw=with_method(read_config_file(DEMO), payload["method"]))
    steps = payload["steps"] + 1
    cfg = config.train.model_copy(update={"max_steps": steps, "eval_max_examples": None, "save_every": 10**9,
                                          "warmup_ratio": 0.0})
    setup_threads(cfg.threads)
    source = resolve_model(config.model.name)
    tokenizer = load_tokenizer(source)
    row_len = payload.get("length") or config.data.max_length
    batch_tokens = max(cfg.batch_tokens, row_len)
    if payload.get("examples") == "demo":
        examples = demo_encoded(config)["train"]
    else:
        examples = _synthetic(payload["examples"], payload.get("length"), len(tokenizer), cfg.seed)
    planned = time.perf_counter()
    batches = packed_batches(examples, batch_tokens, row_len, cfg.seed, tokenizer.pad_token_id, cfg.packing)
    first_epoch = batches.epoch(0)
    plan_s = time.perf_counter() - planned
    model = lora_model(source, config.model.dtype, config.method.model_dump(), cfg.seed)
    marks = []
    with tempfile.TemporaryDirectory() as run_dir:
        fit(model, Accelerator(cpu=True), batches, [], cfg, Path(run_dir),
              on_step=lambda state: marks.append((time.perf_counter(), state.input_tokens)))
    used = [examples[i] for rows in first_epoch[1:steps] for row in rows for i in row]
    flops, terms = flops_per_token(model, used, lora=config.method.name != "full")
    bf16_matmuls = config.model.dtype == "bfloat16" or uses_bf16(cfg.mixed_precision, torch.device("cpu"))
    return {"tokens_per_s": steady_rate(marks), "flops_per_token": flops, "terms": terms,
            "plan_s": plan_s, "examples": len(examples),
            "dtype": "bfloat16" if bf16_matmuls else "float32",
            "rows_per_batch": len(first_epoch[0]), "threads": torch.get_num_threads()}


CHILDREN = {"train": child_train}


# ---------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    if serve_child(CHILDREN):
        return
    args = parse_args(argv)
    parts = args.only or ["peak", "mfu", "length", "size", "roofline"]
    print(f"machine: {machine()}")
    base = {"overrides": args.overrides, "steps": args.steps}

    peak = matmul_peak([512, 1024] if args.quick else [512, 1024, 2048])
    if "peak" in parts:
        print("\n## matmul peak (best of square matmuls, all threads)")
        for dtype, rate in peak.items():
            print(f"{dtype:<9} {rate:8.1f} GFLOP/s")
    bandwidth = memory_bandwidth(128 if args.quick else 512)
    if "peak" in parts:
        print("\n## memory bandwidth (a float32 tensor far beyond the caches, all threads; best and median)")
        for kind in ("read", "copy"):
            print(f"{kind:<9} {bandwidth[kind]:8.1f} GB/s (median {bandwidth[kind + '_median']:.1f})")

    if "mfu" in parts:
        print("\n## model-FLOPs utilisation, demo data "
              "(full: 6N + 12Ldc + 6dVf; LoRA: 4N + 6N_lora + 12Ldc + 4dVf per token)")
        print(f"{'method':<6} {'matmuls':<9} {'tok/s':>7} {'GFLOP/token':>12} {'GFLOP/s':>8} {'MFU':>6} "
              f"{'peak RSS':>9}  terms")
        for method in ("full", "lora"):
            r = measure(__file__, "train", {**base, "method": method, "examples": "demo"})
            achieved = r["tokens_per_s"] * r["flops_per_token"] / 1e9
            # The precision the matmuls run in: bf16 under autocast (train.mixed_precision) or bf16 weights.
            ceiling = peak[r["dtype"]]
            t = r["terms"]
            print(f"{method:<6} {r['dtype']:<9} {r['tokens_per_s']:>7.0f} {r['flops_per_token'] / 1e9:>12.3f} "
                  f"{achieved:>8.1f} {achieved / ceiling:>6.1%} {r['peak_rss_mb']:>6.0f} MB  "
                  f"N={t['N'] / 1e6:.1f}M N_lora={t['N_lora'] / 1e6:.2f}M L={t['L']} d={t['d']} V={t['V']} "
                  f"c={t['c']:.1f} f={t['f']:.3f}", flush=True)

    if "length" in parts:
        lengths = [128, 512, 2048] if args.quick else [128, 256, 512, 1024, 2048]
        print("\n## LoRA against sequence length (synthetic, a quarter of each example trained; "
              "batches of max(batch_tokens, length) tokens)")
        print(f"{'length':>6} {'rows/batch':>10} {'tok/s':>7} {'peak RSS':>9}")
        for length in lengths:
            r = measure(__file__, "train", {**base, "method": "lora", "examples": 64 if args.quick else 256,
                                            "length": length})
            print(f"{length:>6} {r['rows_per_batch']:>10} {r['tokens_per_s']:>7.0f} {r['peak_rss_mb']:>6.0f} MB",
                  flush=True)

    if "size" in parts:
        sizes = [1_000, 100_000] if args.quick else [1_000, 10_000, 100_000]
        print("\n## LoRA against data set size (synthetic, demo-like lengths)")
        print(f"{'examples':>9} {'plan epoch':>10} {'tok/s':>7} {'peak RSS':>9}")
        for size in sizes:
            r = measure(__file__, "train", {**base, "method": "lora", "examples": size})
            print(f"{size:>9} {r['plan_s']:>9.2f}s {r['tokens_per_s']:>7.0f} {r['peak_rss_mb']:>6.0f} MB", flush=True)
    if "roofline" in parts:
        # A chat prompt of ~40 tokens and half of a 32-token answer: serve_load.py's requests.
        print_roofline(decode_terms(args.model), bandwidth, peak, [1, 4, 16], context=56)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
