"""Where a decoding step of the serving engine spends its time: ``--rows`` requests of ``--tokens``
greedy tokens each, half on one LoRA adapter and half on another (a mixed batch), through
``engine.decode`` as the server runs it, under torch.profiler.

    python benchmarks/profile_engine.py                       # SmolLM2-135M, 16 rows x 32 tokens
    python benchmarks/profile_engine.py --tiny --dtype bfloat16
    python benchmarks/profile_engine.py --rows 1 --targets all-linear --repeat 3   # one request, timed too
    python benchmarks/profile_engine.py --tiny --arch gemma3 --layers 30 --rows 1 --targets all-linear --repeat 3

Prints the wall time of the whole decode, the share of it inside the model's forward passes, and the
ops that took the most CPU time (self time). Figures on a shared machine are rough.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tunesmith.model import lay_out_for_decoding, load_model, load_tokenizer, resolve_model
from tunesmith.serve.engine import Caches, Job, Sampling, decode


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tiny", action="store_true", help="a tiny Llama built from a config, on the model's tokenizer")
    p.add_argument("--layers", type=int, default=2, help="--tiny's layers (30, as SmolLM2-135M: the cost of a "
                   "step's ops apart from the size of their weights)")
    p.add_argument("--arch", choices=["llama", "gemma3"], default="llama", help="--tiny's architecture")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--top", type=int, default=15, help="ops listed")
    p.add_argument("--shapes", action="store_true",
                   help="list ops by their inputs' shapes too (which product costs what)")
    p.add_argument("--repeat", type=int, default=0, help="first time this many decodes without the profiler "
                   "and print the best (ms a decoding step)")
    p.add_argument("--targets", default="q_proj,v_proj", help="the LoRA's target modules: comma-separated, "
                   "or all-linear (as benchmarks/serve_load.py's adapters)")
    return p.parse_args(argv)


def build(args):
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    if args.tiny:
        shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                     num_attention_heads=4, num_key_value_heads=2)
        if args.arch == "gemma3":  # five local layers (a window of 8) to a global one, as Gemma 3's
            model = Gemma3ForCausalLM(Gemma3TextConfig(**shape, head_dim=16, sliding_window=8))
        else:
            model = LlamaForCausalLM(LlamaConfig(**shape))
    else:
        model = load_model(source)
    model = model.to(getattr(torch, args.dtype)).eval().requires_grad_(False)
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    lora = LoraConfig(r=8, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(model, lora, adapter_name="alpha")
    model.add_adapter("beta", lora)
    lay_out_for_decoding(model)
    return model.eval(), tokenizer


def jobs(tokenizer, rows: int, tokens: int) -> list[Job]:
    prompts = [f"review {i}: the film was long, the plot thin, and the cast" for i in range(rows)]
    return [Job("alpha" if i % 2 else "beta", tokenizer(p).input_ids, Sampling(tokens, temperature=0),
                emit=lambda event: None) for i, p in enumerate(prompts)]


def main(argv=None) -> None:
    args = parse_args(argv)
    model, tokenizer = build(args)
    place = lambda job: (None, model, True)  # noqa: E731
    decode(place, tokenizer, jobs(tokenizer, 2, 2))  # warm up
    if args.repeat:
        walls = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            decode(place, tokenizer, jobs(tokenizer, args.rows, args.tokens), caches=Caches(prefix_bytes=0))
            walls.append(time.perf_counter() - started)
        best = min(walls)
        print(f"{args.rows} rows x {args.tokens} tokens, {args.dtype}, no profiler: best of {args.repeat} {best:.3f} s, "
              f"{1000 * best / args.tokens:.1f} ms a step, {args.rows * args.tokens / best:.1f} tokens/s")
    forward = 0.0

    def before(module, args_, kwargs):
        nonlocal forward
        forward -= time.perf_counter()

    def after(module, args_, kwargs, output):
        nonlocal forward
        forward += time.perf_counter()

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        started = time.perf_counter()
        decode(place, tokenizer, jobs(tokenizer, args.rows, args.tokens), caches=Caches(prefix_bytes=0))
        wall = time.perf_counter() - started
    for hook in hooks:
        hook.remove()
    print(f"{args.rows} rows x {args.tokens} tokens, {args.dtype}: {wall:.2f} s wall, "
          f"{forward / wall:.0%} of it in forward passes")
    print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
