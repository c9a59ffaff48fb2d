"""What differential privacy costs per step: tunesmith's DP-SGD step against the same job without
DP, and against Opacus's own ``make_private`` on the same PEFT model, interleaved in one run.

    python benchmarks/dp_overhead.py               # 2 rounds of 4 steps each way (~15 min, 2 cores)
    python benchmarks/dp_overhead.py --no-opacus   # tunesmith only

The job is examples/rotten_tomatoes_lora_dp.yaml (LoRA r=16 on SmolLM2-135M, Poisson batches of 64
reviews on average, one review a row), on its first ``--examples`` training reviews:

- ``plain``: the same Poisson batches, one review a row, trained with the ordinary step (no
  per-example gradients, no clipping, no noise): the cost of the job without DP.
- ``tunesmith-dp``: tunesmith's DP step (per-example gradients through ``torch.func``, clipped,
  summed, noised).
- ``opacus``: a plain PyTorch loop over the same PEFT model after Opacus 1.6's
  ``PrivacyEngine.make_private`` (hooks-based per-sample gradients, its DP optimizer and its own
  Poisson data loader, physical batches of ``--physical`` reviews through its
  ``BatchMemoryManager``), with the same label-only loss, clipping norm, noise and batch size: Opacus's
  best configuration here (ghost clipping refuses models with tied embeddings, and SmolLM2 ties them).

Each measurement runs in a child process of its own (its peak resident memory is its own). Reported
per layout: the median over rounds of seconds per step and reviews per second, leaving out each
round's first step. The last line reads ``dp X.XXx plain's s/step  opacus Y.YYx  dp vs opacus Z.ZZx``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from harness import ROOT, lora_model, machine, measure, serve_child

DP_DEMO = ROOT / "examples" / "rotten_tomatoes_lora_dp.yaml"


def _session(payload: dict):
    from tunesmith.config import load_config
    from tunesmith.session import Session

    config = load_config(DP_DEMO)
    session = Session(config)
    session.prepare()
    items = session.data.encoded["train"][: payload["examples"]]
    return config, session, items


def _tunesmith(payload: dict, private: bool) -> dict:
    from functools import partial

    from accelerate import Accelerator

    from tunesmith.privacy.accounting import Budget
    from tunesmith.privacy.dp import DPStep
    from tunesmith.privacy.sampler import PoissonBatches
    from tunesmith.train.loop import fit
    from tunesmith.train.step import DefaultStep

    config, session, items = _session(payload)
    p = config.privacy
    batches = PoissonBatches(items, session.objective.batches, p.expected_batch_size, config.train.seed)
    budget = Budget(noise_multiplier=payload["noise"], max_grad_norm=p.max_grad_norm,
                    expected_batch_size=p.expected_batch_size, sample_rate=batches.sample_rate, delta=1e-5,
                    accountant="prv", planned_steps=payload["steps"])
    model = lora_model(session.model_source, config.model.dtype, config.method.model_dump(), config.train.seed)
    cfg = config.train.model_copy(update={"max_steps": payload["steps"], "save_every": 10**9, "warmup_ratio": 0.0})
    marks = []
    with tempfile.TemporaryDirectory() as run_dir:
        fit(model, Accelerator(cpu=True), batches, [], cfg, Path(run_dir),
            make_step=partial(DPStep, budget=budget) if private else DefaultStep,
            on_step=lambda state: marks.append(time.perf_counter()))
    examples = sum(len(batches.draw(step)) for step in range(1, payload["steps"]))
    return {"seconds": marks[-1] - marks[0], "steps": len(marks) - 1, "examples": examples}


def _opacus(payload: dict) -> dict:
    import torch
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from torch.utils.data import DataLoader, TensorDataset

    from tunesmith.data.format import IGNORE

    config, session, items = _session(payload)
    p = config.privacy
    pad = session.tokenizer.pad_token_id
    width = max(len(it["input_ids"]) for it in items)

    def padded(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([it[key] + [fill] * (width - len(it[key])) for it in items])

    ids, labels = padded("input_ids", pad), padded("labels", IGNORE)
    mask = torch.tensor([[1] * len(it["input_ids"]) + [0] * (width - len(it["input_ids"])) for it in items])
    model = lora_model(session.model_source, config.model.dtype, config.method.model_dump(), config.train.seed)
    model.train()
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=config.train.lr)
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=p.expected_batch_size)
    engine = PrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=payload["noise"],
        max_grad_norm=p.max_grad_norm, poisson_sampling=True, grad_sample_mode="hooks")
    marks, examples = [], 0
    # Opacus's own way to bound memory: physical batches of at most ``physical`` reviews, one
    # optimizer step per logical (Poisson) batch, as tunesmith's micro-batches do.
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=payload["physical"],
                            optimizer=optimizer) as physical:
        for input_ids, attention_mask, target in physical:
            # Each review's mean loss over its label tokens, as tunesmith's DP step clips it; Opacus's
            # per-sample gradients are those of the batch's mean.
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
            target = target[:, 1:]
            token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE,
                                                           reduction="none")
            per_example = token_loss.sum(1) / (target != IGNORE).sum(1).clamp(min=1)
            per_example.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if marks:
                examples += len(input_ids)
            if not optimizer._is_last_step_skipped:
                marks.append(time.perf_counter())
                if len(marks) == payload["steps"]:
                    break
    return {"seconds": marks[-1] - marks[0], "steps": len(marks) - 1, "examples": examples}


CHILDREN = {"plain": lambda p: _tunesmith(p, False), "tunesmith-dp": lambda p: _tunesmith(p, True),
            "opacus": _opacus}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="Optimizer steps per layout per round (the first is dropped).")
    p.add_argument("--examples", type=int, default=4000, help="Training reviews the Poisson batches are drawn from.")
    p.add_argument("--noise", type=float, default=0.6, help="Noise multiplier (its value does not change the cost).")
    p.add_argument("--physical", type=int, default=16,
                   help="Opacus: reviews per physical batch (BatchMemoryManager); 64 at once runs out of 24 GiB")
    p.add_argument("--no-opacus", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    if serve_child(CHILDREN):
        return
    args = parse_args(argv)
    print(f"machine: {machine()}")
    names = ["plain", "tunesmith-dp"] + ([] if args.no_opacus else ["opacus"])
    payload = {"steps": args.steps, "examples": args.examples, "noise": args.noise, "physical": args.physical}
    results = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names:
            r = measure(__file__, name, payload)
            results[name].append(r)
            print(f"round {round_ + 1} {name:<12}: {r['seconds'] / r['steps']:6.2f} s/step "
                  f"{r['examples'] / r['seconds']:6.2f} reviews/s  peak RSS {r['peak_rss_mb']:6.0f} MB", flush=True)
    step_s = {n: statistics.median(r["seconds"] / r["steps"] for r in rs) for n, rs in results.items()}
    for name, rs in results.items():
        print(f"{name:<12} median {step_s[name]:6.2f} s/step "
              f"{statistics.median(r['examples'] / r['seconds'] for r in rs):6.2f} reviews/s  "
              f"peak RSS {max(r['peak_rss_mb'] for r in rs):6.0f} MB")
    line = f"dp {step_s['tunesmith-dp'] / step_s['plain']:.2f}x plain's s/step"
    if "opacus" in step_s:
        line += (f"  opacus {step_s['opacus'] / step_s['plain']:.2f}x"
                 f"  dp vs opacus {step_s['opacus'] / step_s['tunesmith-dp']:.2f}x faster")
    print(line)


if __name__ == "__main__":
    main()
