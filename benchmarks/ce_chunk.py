"""The chunk size of the label-only cross-entropy (tunesmith.train.loss.CHUNK): step time and peak memory.

    python benchmarks/ce_chunk.py                 # chunks of 256, 512, 1024 and 2048 tokens (~5 min, 2 cores)
    python benchmarks/ce_chunk.py 512 2048

Runs LoRA training steps on the continued pre-training example (examples/hamlet_continued_pretraining.yaml),
where every token carries a label, so the output projection and cross-entropy cover whole batches.
Each chunk size runs in its own process (peak RSS is its own); the first step is left out of the times.
"""

from __future__ import annotations

import statistics
import sys
import time

from harness import ROOT, demo_encoded, lora_model, machine, measure, serve_child

CONFIG = ROOT / "examples" / "hamlet_continued_pretraining.yaml"


def child_steps(payload: dict) -> dict:
    import torch

    import tunesmith.objectives.lm_loss as loss
    from tunesmith.config import load_config
    from tunesmith.data.batching import collate, plan_batches
    from tunesmith.model import load_tokenizer, resolve_model
    from tunesmith.train.precision import autocast

    loss.CHUNK = payload["chunk"]
    config = load_config(CONFIG)
    source = resolve_model(config.model.name)
    tokenizer = load_tokenizer(source)
    examples = demo_encoded(config)["train"]
    model = lora_model(source, config.model.dtype, config.method.model_dump(), config.train.seed)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.train.lr)
    row_len = config.data.max_length
    batches = plan_batches(examples, config.train.batch_tokens, row_len, config.train.seed)
    times = []
    for rows in batches[: payload["steps"] + 1]:
        batch = collate(examples, rows, row_len, tokenizer.pad_token_id)
        started = time.perf_counter()
        with autocast(config.train.mixed_precision, torch.device("cpu")):
            total, n = loss.loss_sum(model, batch)
        (total / n).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    return {"step_s": statistics.median(times[1:]), "trained_tokens": n}


CHILDREN = {"steps": child_steps}


def main() -> None:
    if serve_child(CHILDREN):
        return
    chunks = [int(c) for c in sys.argv[1:]] or [256, 512, 1024, 2048]
    print(f"machine: {machine()}")
    print(f"{'chunk':>6} {'median step':>12} {'peak RSS':>9}")
    for chunk in chunks:
        r = measure(__file__, "steps", {"chunk": chunk, "steps": 4})
        print(f"{chunk:>6} {r['step_s']:>11.2f}s {r['peak_rss_mb']:>6.0f} MB", flush=True)


if __name__ == "__main__":
    main()
