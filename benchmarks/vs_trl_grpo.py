"""tunesmith against TRL's GRPOTrainer: the same GRPO job with LoRA, timed to the same held-out reward.

    python benchmarks/vs_trl_grpo.py                        # 20 steps of 4 prompts x 8 answers
    python benchmarks/vs_trl_grpo.py --steps 2 --eval-every 1 --eval-prompts 4   # smoke run

Both sides train the bundled SmolLM2-135M-Instruct with the settings of
examples/rotten_tomatoes_grpo.yaml: LoRA r=16 on every linear layer from the same initial weights,
the same training prompts in the same order (the reviews, framed by the same chat template and
system prompt), G=8 answers per prompt, 4 prompts a step, at most 48 new tokens at temperature 1,
two passes of clipped updates over minibatches of 16 answers (4 optimizer updates a step), the
DAPO token-level loss, rewards scaled by the group's std, no KL term (beta 0, so neither side runs a
reference), a constant learning rate. The reward is the same function for both: tunesmith's
``grpo_rewards.Rewards`` built from the example's ``grpo.rewards`` (JSON schema + the review's
label, 0 to 2), which TRL calls as its reward function.

Every ``--eval-every`` steps each side's policy answers the held-out prompts greedily (the same
prompts, the same scoring), outside the timed training; the benchmark prints the curve of held-out
reward against training seconds. The target is the best held-out reward TRL reaches (or
``--target``); time-to-target is the training time at a side's first evaluation at or above it.

Each side runs in a child process of its own (``harness.measure``), so its peak resident memory is
its own. TRL is a benchmark-only dependency: `pip install -e ".[bench]"`.

The last line reads: ``time-to-reward Nx  memory Mx  reward tunesmith A trl B  target T  step-time Sx``
(time-to-reward: TRL's time to the target over tunesmith's; memory: tunesmith's peak RSS over TRL's;
step-time: TRL's training seconds per step over tunesmith's).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from harness import (
    ROOT,
    Clock,
    best_after_start,
    both_sides,
    lora_model,
    machine,
    same_initial_adapter,
    serve_child,
    time_to_quality,
)

CONFIG = ROOT / "examples" / "rotten_tomatoes_grpo.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="GRPO steps (both sides; 4 optimizer updates each)")
    p.add_argument("--eval-every", type=int, default=5, help="held-out evaluation every N steps")
    p.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts scored at each evaluation")
    p.add_argument("--target", type=float, default=None, help="held-out reward to reach (default: TRL's best)")
    p.add_argument("--trl-bf16", action="store_true", help="TRL under bf16 autocast (a CPU with native bf16)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the example config (e.g. grpo.samples_per_prompt=4); repeatable")
    return p.parse_args(argv)


def _config(overrides: list[str]):
    from tunesmith.align.options import load_grpo_config

    return load_grpo_config(CONFIG, overrides)


def prepare_spec(args) -> dict:
    """What both sides need, as plain data: the prompts (user turns) and their rows, split as
    ``tunesmith grpo`` splits them, and the settings."""
    from tunesmith.align.prompts import read_prompts
    from tunesmith.model import resolve_model

    config = _config(args.overrides)
    cfg, train = config.grpo, config.train
    prompts = read_prompts(cfg, train.seed)
    train_prompts, eval_prompts = prompts.split()
    train_rows, eval_rows = prompts.split_rows()
    return {"model": str(resolve_model(config.model.name)), "method": config.method.model_dump(),
            "overrides": args.overrides, "steps": args.steps, "eval_every": args.eval_every,
            "system": cfg.system_prompt, "seed": train.seed, "trl_bf16": args.trl_bf16,
            "train": [{"prompt": p, "row": _plain(r)} for p, r in zip(train_prompts, train_rows)],
            "eval": [{"prompt": p, "row": _plain(r)} for p, r in
                     list(zip(eval_prompts, eval_rows))[: args.eval_prompts]]}


def _plain(row: dict) -> dict:
    return json.loads(json.dumps(row, default=str))


def step_prompts(spec: dict) -> list[dict]:
    """The training prompts in the order tunesmith takes them (``prompts_of_step``), step after step."""
    from tunesmith.align.prompts import prompts_of_step

    config = _config(spec["overrides"])
    per_step = config.grpo.prompts_per_step
    return [item for step in range(spec["steps"])
            for item in prompts_of_step(spec["train"], step, per_step, spec["seed"])]


class HeldOut:
    """The held-out evaluation both sides share: greedy answers to the held-out prompts, framed by
    tunesmith's policy framing, scored by the example's rewards; the mean reward and format share."""

    def __init__(self, spec: dict):
        from tunesmith.align.grpo_rewards import Rewards
        from tunesmith.align.prompts import framed, framing

        config = _config(spec["overrides"])
        self.tokenizer, encoder = framing(config)
        self.rewards = Rewards(config.grpo.rewards, "cpu")
        self.max_new_tokens = config.grpo.max_new_tokens
        self.prompts = [e["prompt"] for e in spec["eval"]]
        self.rows = [e["row"] for e in spec["eval"]]
        self.encoded = [self.tokenizer(framed(encoder, p), add_special_tokens=False).input_ids for p in self.prompts]

    def __call__(self, model) -> dict:
        import torch

        from tunesmith.align.rollout import answer_texts, sample

        was_training = model.training
        model.eval()
        with torch.no_grad():
            rollout = sample(model, self.tokenizer, self.encoded, 1, self.max_new_tokens, 1.0, 1, "cpu")
        model.train(was_training)
        total, by_name = self.rewards(self.prompts, answer_texts(self.tokenizer, rollout), self.rows)
        return {"reward": float(total.mean()), **{n: sum(s) / len(s) for n, s in by_name.items()}}


def main(argv=None) -> None:
    if serve_child(CHILDREN):
        return
    args = parse_args(argv)
    print(f"machine: {machine()}")
    spec = prepare_spec(args)
    print(f"{len(spec['train'])} training prompts, {args.steps} steps, {len(spec['eval'])} held-out prompts, "
          f"evaluation every {args.eval_every} steps")
    results = both_sides(__file__, spec, "reward",
                         lambda r: f"{r['train_s']:7.1f} s training ({r['train_s'] / args.steps:.1f} s a step)")
    ours, theirs = results["tunesmith"], results["trl"]
    target = args.target if args.target is not None else best_after_start(theirs["curve"], "reward", higher=True)
    ratio = time_to_quality({side: r["curve"] for side, r in results.items()}, "reward", target, higher=True)
    print(f"time-to-reward {ratio}  memory {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x  "
          f"reward tunesmith {ours['curve'][-1]['reward']:.3f} trl {theirs['curve'][-1]['reward']:.3f}  "
          f"target {target:.3f}  step-time {theirs['train_s'] / ours['train_s']:.2f}x")


def child_tunesmith(spec: dict) -> dict:
    """tunesmith's GRPO step (``grpo_recipe.grpo_step``) over the same prompts, step after step."""
    import torch

    from tunesmith.align.grpo_recipe import GRPOSteps, Parts, updates_per_step
    from tunesmith.train.loop import make_optimizer, make_scheduler
    from tunesmith.train.processes import setup_threads

    config = _config(spec["overrides"])
    setup_threads(config.train.threads)
    torch.manual_seed(spec["seed"])
    parts = Parts(config)  # the policy as `tunesmith grpo` builds it: same prompts, same framing
    model = same_initial_adapter(parts.policy.model, spec["seed"])
    optimizer = make_optimizer(model, config.train)
    scheduler = make_scheduler(optimizer, config.train, spec["steps"] * updates_per_step(config.grpo))
    steps = GRPOSteps(parts, optimizer, scheduler)
    assert [p for p, _ in steps.prompts] == [e["prompt"] for e in spec["train"]], "the prompts differ"
    clock = Clock(HeldOut(spec), "reward")
    clock.evaluate(model, 0)
    for step in range(spec["steps"]):
        steps.step(step)
        if (step + 1) % spec["eval_every"] == 0 or step + 1 == spec["steps"]:
            clock.evaluate(model, step + 1)
    return {"train_s": clock.spent, "curve": clock.curve}


def child_trl(spec: dict) -> dict:
    """TRL's GRPOTrainer on the same prompts in the same order, with the same reward."""
    import logging

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tunesmith.align.grpo_recipe import updates_per_step
    from tunesmith.model import load_tokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    config = _config(spec["overrides"])
    cfg, train = config.grpo, config.train
    torch.set_num_threads(os.cpu_count())
    updates = updates_per_step(cfg)
    answers = cfg.prompts_per_step * cfg.samples_per_prompt
    minibatch = cfg.minibatch_size or answers
    ordered = step_prompts(spec)
    system = [{"role": "system", "content": spec["system"]}] if spec["system"] else []
    dataset = Dataset.from_list([{"prompt": system + [{"role": "user", "content": e["prompt"]}],
                                  "row": json.dumps(e["row"])} for e in ordered])
    rewards = HeldOut(spec).rewards

    def reward(prompts, completions, row, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        total, _ = rewards([""] * len(texts), texts, [json.loads(r) for r in row])
        return total.tolist()

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=True, seed=spec["seed"], data_seed=spec["seed"],
        max_steps=spec["steps"] * updates, shuffle_dataset=False,
        per_device_train_batch_size=minibatch, gradient_accumulation_steps=1,
        steps_per_generation=answers // minibatch, num_generations=cfg.samples_per_prompt,
        num_iterations=cfg.num_iterations, max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_k=cfg.top_k or 0, top_p=1.0,
        learning_rate=train.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm or 0.0, optim="adamw_torch",
        beta=cfg.beta, epsilon=cfg.clip, loss_type=cfg.loss_type, importance_sampling_level=cfg.importance,
        scale_rewards="group" if cfg.scale_rewards else "none", mask_truncated_completions=cfg.mask_truncated,
        bf16=spec["trl_bf16"], gradient_checkpointing=False, logging_steps=10**6, report_to="none",
        disable_tqdm=True, save_strategy="no", dataloader_num_workers=0)
    model = same_initial_adapter(lora_model(spec["model"], "float32", spec["method"], spec["seed"]), spec["seed"])
    held_out = HeldOut(spec)

    class Evaluate(TrainerCallback):
        """Held-out evaluation every ``eval_every`` GRPO steps, the clock stopped meanwhile."""

        def __init__(self):
            self.clock = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.clock = Clock(held_out, "reward")
            self.clock.evaluate(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            # TRL counts optimizer updates: a GRPO step is (answers / minibatch) of them, num_iterations
            # times over (it samples anew every steps_per_generation x num_iterations updates).
            if state.global_step % updates == 0:
                step = state.global_step // updates
                if step % spec["eval_every"] == 0 or step == spec["steps"]:
                    self.clock.evaluate(model, step)

    callback = Evaluate()
    trainer = GRPOTrainer(model=model, args=args, reward_funcs=reward, train_dataset=dataset,
                          processing_class=load_tokenizer(spec["model"]), callbacks=[callback])
    trainer.train()
    return {"train_s": callback.clock.spent, "curve": callback.clock.curve}


CHILDREN = {"tunesmith": child_tunesmith, "trl": child_trl}


if __name__ == "__main__":
    main()
