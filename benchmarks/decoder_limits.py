"""What is left of a lone request's decoding step in ``serve/decoder.py``, measured in one process.

    python benchmarks/decoder_limits.py                 # the products alone, then the step compiled
    python benchmarks/decoder_limits.py --no-compile    # the products alone (a minute)

1. The products alone: SmolLM2-135M's layer products at one row (q/k/v, o, gate/up and down fused as
   the decoder fuses them), 30 layers of distinct weights so they stream from memory as in a real
   step, in float32 (column-major, as ``model.lay_out_for_decoding`` lays them, and packed for
   oneDNN) and in bfloat16 packed for oneDNN where it runs natively, row-major elsewhere (torch's
   own one-row kernel, as the decoder runs it there): milliseconds for all 30
   layers and the rate they read the weights at; then the cost of one packed bfloat16 call on a
   64 x 64 weight (its fixed cost) against a float32 product of the same size.
2. The step compiled: the decoder's layer loop written for ``torch.compile`` (the slot tensors as
   the graph's inputs, written in place; shapes dynamic), on SmolLM2 with two LoRA adapters on every
   linear layer, float32, one request of 48 tokens: the compile time, then ms a token compiled and
   eager, alternating, and whether the tokens are the same. (Weights packed for oneDNN are opaque to
   dynamo: the step runs on column-major float32 weights on every CPU.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tunesmith.model import packs_bfloat16

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2's fused products: out x in
LAYERS = 30


def best_ms(work, runs: int = 5) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def products() -> None:
    torch.manual_seed(0)
    weights = [[torch.randn(o, i) * 0.02 for o, i in SHAPES] for _ in range(LAYERS)]
    column = [[w.t().contiguous() for w in layer] for layer in weights]
    inputs = [torch.randn(1, i) for _, i in SHAPES]
    weights_per_layer = sum(o * i for o, i in SHAPES)

    def f32():
        for layer in column:
            for x, w in zip(inputs, layer):
                x @ w

    def packed(dtype):
        layers = [[torch.ops.mkldnn._reorder_linear_weight(w.to(dtype)) for w in layer] for layer in weights]
        def work():
            for layer in layers:
                for x, w in zip(inputs, layer):
                    x = x.to(dtype)
                    torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return work

    def row_major(dtype):  # torch's own one-row kernel for 2-byte weights (model.widens_for_decoding)
        layers = [[w.to(dtype) for w in layer] for layer in weights]
        def work():
            for layer in layers:
                for x, w in zip(inputs, layer):
                    F.linear(x.to(dtype), w)
        return work

    # float32 packed where oneDNN is there (model.packs_for_decoding's choice on CPUs not made by
    # Intel); bfloat16 packed only where oneDNN runs it natively, row-major where it does not.
    kinds = [("float32, column-major (BLAS)", f32, 4)]
    if torch.backends.mkldnn.is_available():
        kinds.append(("float32, packed for oneDNN", packed(torch.float32), 4))
    if packs_bfloat16():
        kinds.append(("bfloat16, packed for oneDNN", packed(torch.bfloat16), 2))
    else:
        kinds.append(("bfloat16, row-major (torch)", row_major(torch.bfloat16), 2))
    print(f"## the layer products at one row, {LAYERS} layers of SmolLM2's shapes, best of 5")
    for name, work, size in kinds:
        ms = best_ms(work)
        print(f"{name:28s} {ms:6.2f} ms  {LAYERS * weights_per_layer * size / ms / 1e6:5.1f} GB/s")
    # A few rows (a batch of requests, one new token each): where the BLAS and oneDNN part ways.
    for rows in (4, 16):
        inputs[:] = [torch.randn(rows, i) for _, i in SHAPES]
        line = ", ".join(f"{name} {best_ms(work):6.2f} ms" for name, work, size in kinds)
        print(f"{rows:2d} rows: {line}")
    if not packs_bfloat16():
        print("(no native bfloat16 in oneDNN on this CPU: bfloat16 runs row-major, not packed)")
        return
    small = torch.randn(64, 64)
    small_packed = torch.ops.mkldnn._reorder_linear_weight(small.bfloat16())
    x, x16 = torch.randn(1, 64), torch.randn(1, 64).bfloat16()
    calls = 2000
    packed_us = best_ms(lambda: [torch.ops.mkldnn._linear_pointwise(x16, small_packed, None, "none", [], "")
                                 for _ in range(calls)]) * 1000 / calls
    plain_us = best_ms(lambda: [x @ small.t() for _ in range(calls)]) * 1000 / calls
    print(f"one call on a 64 x 64 weight: packed bfloat16 {packed_us:.1f} us, float32 {plain_us:.1f} us")


def compiled_step(tokens: int = 48) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import profile_engine

    from tunesmith.serve.decoder import LlamaDecoder
    from tunesmith.serve.kvcache import SlotCache

    os.environ["TUNESMITH_DECODE_LAYOUT"] = "column"  # dynamo cannot trace weights packed for oneDNN

    model, tokenizer = profile_engine.build(profile_engine.parse_args(["--targets", "all-linear"]))
    decoder = LlamaDecoder.of(model)
    heads, kv_heads, dim = decoder.heads, decoder.kv_heads, decoder.head_dim
    half = dim // 2
    prompt = torch.tensor([tokenizer("review 1: the film was long, the plot thin, and the cast").input_ids])

    def layers(hidden, cos, sin, index, keys, values, first: int, width: int):
        for layer, key_cache, value_cache in zip(decoder.layers, keys, values):
            qkv = layer.qkv(layer.norms[0](hidden), "alpha").view(1, 1, heads + 2 * kv_heads, dim)
            qk = qkv[:, :, :heads + kv_heads]
            qk = qk * cos + qk.roll(half, -1) * sin
            key_cache.view(-1, kv_heads, dim).index_copy_(0, index, qk[:, :, heads:].reshape(-1, kv_heads, dim))
            values_now = qkv[:, :, heads + kv_heads:].reshape(-1, kv_heads, dim)
            value_cache.view(-1, kv_heads, dim).index_copy_(0, index, values_now)
            attended = F.scaled_dot_product_attention(
                qk[:, :, :heads].transpose(1, 2), key_cache[first:first + 1, :width].transpose(1, 2),
                value_cache[first:first + 1, :width].transpose(1, 2), scale=decoder.scaling, enable_gqa=True)
            hidden = layer.o(attended.transpose(1, 2).reshape(1, heads * dim), "alpha", residual=hidden)
            gate, up = layer.gate_up(layer.norms[1](hidden), "alpha").split(layer.gate_up_sizes, dim=-1)
            hidden = layer.down(F.silu(gate).mul_(up), "alpha", residual=hidden)
        return hidden

    def step_with(loop):
        def step(token: torch.Tensor, start: torch.Tensor, slots: SlotCache) -> torch.Tensor:
            width = slots.bind(0, start, 1)
            rotary = decoder._table(int(start.max()) + 1, "cpu")[start[:, None]]
            hidden = loop(decoder.embed(token).view(1, -1), rotary[:, :, None, 0], rotary[:, :, None, 1],
                          slots._index, slots.keys, slots.values, 0, width)
            return decoder.head(decoder.norm(hidden), None)
        return step

    def decode(step, n: int) -> tuple[float, list[int]]:
        slots = SlotCache()
        slots.reserve(1, prompt.shape[1] + n + 1)
        out = [int(decoder.forward(prompt, torch.tensor([0]), slots, 0, ["alpha"])[0, -1].argmax())]
        started = time.perf_counter()
        for i in range(n):
            out.append(int(step(torch.tensor([[out[-1]]]), torch.tensor([prompt.shape[1] + i]), slots)[0].argmax()))
        return (time.perf_counter() - started) / n * 1000, out

    eager = step_with(layers)
    compiled = step_with(torch.compile(layers, dynamic=True))
    started = time.perf_counter()
    decode(compiled, 8)
    print(f"\n## one request on SmolLM2, float32, two LoRA adapters on every linear layer, {tokens} tokens")
    print(f"compile (and 8 tokens): {time.perf_counter() - started:.1f} s")
    _, expected = decode(eager, tokens)
    for _ in range(2):
        eager_ms, _ = decode(eager, tokens)
        compiled_ms, out = decode(compiled, tokens)
        print(f"eager {eager_ms:.1f} ms a token, compiled {compiled_ms:.1f} ms a token, same tokens: {out == expected}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-compile", action="store_true", help="the products alone")
    args = parser.parse_args(argv)
    products()
    if not args.no_compile:
        compiled_step()


if __name__ == "__main__":
    main()
