"""Differentially private training (DP-SGD): the per-example gradients, the clipping, the step, the
Poisson sampler and the accounting, each against a slow reference; a private run end to end; and
the bad inputs, one clear line each."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import cli_fails, random_examples, write_config
from tunesmith.config import validate_config
from tunesmith.data.format import IGNORE
from tunesmith.errors import TunesmithError
from tunesmith.methods import get_method
from tunesmith.objectives.base import Batches, Layout
from tunesmith.objectives.causal import PackedBatches
from tunesmith.privacy.accounting import Budget, default_delta, epsilon, plan_budget
from tunesmith.privacy.dp import DPStep, clip_and_sum, refuse_processes
from tunesmith.privacy.options import PrivacyConfig
from tunesmith.privacy.sampler import PoissonBatches
from tunesmith.train.options import TrainConfig
from tunesmith.train.step import DefaultStep, LossForward

ROW_LEN = 40
ROOT = Path(__file__).parent.parent


def _model(model_dir, method: str = "lora"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    m = get_method(method)
    options = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}.get(method, {})
    model = m.apply(model, m.options(**options))
    with torch.no_grad():  # LoRA's B and the adapters' up start at zero, which leaves the rest without gradient
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0, 0.1)
    return model.train()


def _layout(method: str = "lora", batch_tokens: int = 3 * ROW_LEN) -> Layout:
    return Layout(batch_tokens, ROW_LEN, pad_id=0, seed=0, one_per_row=True,
                  direct=get_method(method).direct_decoder)


def _budget(noise: float = 0.0, clip: float = 1e6, batch: int = 6) -> Budget:
    return Budget(noise_multiplier=noise, max_grad_norm=clip, expected_batch_size=batch, sample_rate=1.0,
                  delta=1e-5, accountant="rdp", planned_steps=1)


def _dp_step(model, batches, budget, optimizer=None, scheduler=None) -> DPStep:
    from accelerate import Accelerator

    cfg = TrainConfig(mixed_precision="no")
    return DPStep(LossForward(model, batches), optimizer, scheduler, Accelerator(cpu=True), batches, cfg,
                  budget=budget)


def _equal_length_examples(n: int = 6, seed: int = 0) -> list[dict]:
    """Examples with the same number of trained tokens: a DP step's per-example means then average
    to the token mean that the ordinary step takes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 300, (12,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * 6 + ids[6:]})
    return out


# --- per-example gradients ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "full", "ia3", "adapter", "prefix", "prompt", "ptuning"])
def test_per_example_gradients_equal_one_backward_per_example(tiny_model_dir, method):
    # The reference is the objective's ordinary loss (label-only logits, chunked), one example at a
    # time; the DP step's comes from vmap over rows of the vmap-safe row loss. Full fine-tuning
    # covers the tied input and output embeddings.
    model = _model(tiny_model_dir, method)
    examples = random_examples(6)
    batches = PoissonBatches(examples, lambda items: PackedBatches(items, _layout(method, ROW_LEN)), 6, seed=0)
    step = _dp_step(model, batches, _budget())
    plain = PackedBatches(examples, _layout(method))
    params = {n: p.detach() for n, p in zip(step.names, step.params)}
    micro = batches.micro_batches(batches.tensors(list(range(6))))
    assert len(micro) > 1  # several micro-batches, several rows each
    checked = 0
    for batch in micro:
        grads, (losses, counts) = step.example_grads(params, batch)
        for r in range(len(batch["input_ids"])):
            _, sums, n = plain.example_losses(model, {k: v[r : r + 1] for k, v in batch.items()})
            expected = torch.autograd.grad(sums[0] / n[0], step.params)
            torch.testing.assert_close(losses[r], sums[0].detach(), rtol=1e-5, atol=1e-5)
            assert counts[r] == n[0]
            for name, want in zip(step.names, expected):
                assert want.abs().sum() > 0, name
                torch.testing.assert_close(grads[name][r], want, rtol=1e-4, atol=1e-6, msg=name)
            checked += 1
    assert checked == 6


# --- clipping and the step ------------------------------------------------------------------------

def test_clip_and_sum_scales_only_examples_over_the_norm():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, 5, generator=g), torch.randn(4, 7, generator=g)]
    grads[0][0] *= 1e-3
    grads[1][0] *= 1e-3  # example 0 is well inside the norm
    summed, norms = clip_and_sum(grads, max_norm=1.0)
    by_hand = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    torch.testing.assert_close(norms, by_hand)
    scale = [min(1.0, 1.0 / float(n)) for n in norms]
    assert scale[0] == 1.0 and all(s < 1 for s in scale[1:])
    for got, g in zip(summed, grads):
        torch.testing.assert_close(got, sum(s * g[i] for i, s in enumerate(scale)))


def test_clipping_bounds_each_examples_contribution(tiny_model_dir):
    # One step per example, no noise: the gradient handed to the optimizer, times the expected batch
    # size, is that example's clipped gradient: its norm is the clipping norm (the raw gradients are
    # larger), and the step on all of them is the sum of the steps on each.
    clip = 1e-3
    examples = random_examples(4)
    model = _model(tiny_model_dir)
    batches = PoissonBatches(examples, lambda items: PackedBatches(items, _layout()), 4, seed=0)
    step = _dp_step(model, batches, _budget(clip=clip, batch=1))

    def contribution(rows: list[int]) -> torch.Tensor:
        summed, _, _ = step.clipped_sum([batches.tensors(rows)])
        return torch.cat([s.flatten() for s in summed])

    each = [contribution([i]) for i in range(4)]
    for c in each:
        assert c.norm() == pytest.approx(clip, rel=1e-4)
    torch.testing.assert_close(contribution([0, 1, 2, 3]), sum(each), rtol=1e-4, atol=1e-9)


def _optimizer_grads(model, make_step, batches, tensors) -> dict[str, torch.Tensor]:
    from tunesmith.train.loop import make_optimizer, make_scheduler

    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}

    def capture(optimizer, args, kwargs):
        seen.update({names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"]})

    cfg = TrainConfig(max_grad_norm=None, warmup_ratio=0.0, mixed_precision="no")
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, 1)
    from accelerate import Accelerator

    step = make_step(LossForward(model, batches), optimizer, scheduler, Accelerator(cpu=True), batches, cfg)
    handle = register_optimizer_step_pre_hook(capture)
    try:
        step(tensors)
    finally:
        handle.remove()
    return seen


def test_with_no_noise_and_no_clipping_a_dp_step_is_the_ordinary_step(tiny_model_dir):
    # The same six examples, in one batch: DefaultStep (token mean) against DPStep with noise 0 and
    # a clipping norm no gradient reaches. Every example trains 6 tokens, and the expected batch
    # size is the batch drawn, so both take the same mean. Also a guard against silently wrong LoRA
    # updates (Opacus #820): the gradients the optimizer gets are compared, parameter by parameter.
    examples = _equal_length_examples()
    plain = PackedBatches(examples, _layout(batch_tokens=6 * ROW_LEN))
    rows = plain.epoch(-1)
    assert len(rows) == 1
    ordinary = _optimizer_grads(_model(tiny_model_dir), DefaultStep, plain, [plain.tensors(rows[0])])

    private = PoissonBatches(examples, lambda items: PackedBatches(items, _layout()), 6, seed=0)
    dp = _optimizer_grads(_model(tiny_model_dir), lambda *a: DPStep(*a, budget=_budget(batch=6)), private,
                          [private.tensors(list(range(6)))])
    assert dp.keys() == ordinary.keys() and len(dp) == 28
    for name, grad in ordinary.items():
        assert grad.abs().sum() > 0, name
        # float32 throughout, but per-example and batched gradients sum in another order, and CPUs
        # differ in how (AVX512-BF16 machines' kernels block their sums otherwise): the tolerance is
        # relative to the parameter's largest gradient, far below what a wrong update would change.
        torch.testing.assert_close(dp[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)


def test_noise_is_added_once_per_logical_batch_whatever_its_micro_batches(tiny_model_dir):
    # An empty batch: the update is the noise alone, of std noise x clip / expected batch size.
    # The same batch split into more micro-batches gets the same noise (the same seed) on top of
    # the same clipped sum.
    examples = random_examples(6)
    budget = _budget(noise=2.0, clip=0.5, batch=4)

    micro = {}

    def grads(batch_tokens: int, rows: list[int]) -> torch.Tensor:
        model = _model(tiny_model_dir)
        batches = PoissonBatches(examples, lambda items: PackedBatches(items, _layout(batch_tokens=batch_tokens)),
                                 4, seed=0)
        micro[batch_tokens, len(rows)] = len(batches.micro_batches(batches.tensors(rows)))
        torch.manual_seed(1)
        got = _optimizer_grads(model, lambda *a: DPStep(*a, budget=budget), batches, [batches.tensors(rows)])
        return torch.cat([g.flatten() for g in got.values()])

    noise = grads(ROW_LEN, [])
    assert noise.std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.05)
    split = grads(ROW_LEN, [0, 1, 2, 3, 4, 5])
    whole = grads(6 * ROW_LEN, [0, 1, 2, 3, 4, 5])
    assert micro == {(ROW_LEN, 0): 0, (ROW_LEN, 6): micro[ROW_LEN, 6], (6 * ROW_LEN, 6): 1} and micro[ROW_LEN, 6] > 1
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(split, noise)


# --- the Poisson sampler --------------------------------------------------------------------------

def test_poisson_batches_draw_each_example_with_the_sample_rate():
    examples = random_examples(200)
    batches = PoissonBatches(examples, lambda items: PackedBatches(items, _layout(batch_tokens=120)), 20, seed=3)
    assert isinstance(batches, Batches)
    assert len(batches.epoch(0)) == 10  # N / expected batch size steps make an epoch
    draws = [b for e in range(50) for b in batches.epoch(e)]
    sizes = torch.tensor([len(b) for b in draws], dtype=torch.float)
    assert sizes.mean().item() == pytest.approx(20, rel=0.05)
    assert sizes.var().item() == pytest.approx(200 * 0.1 * 0.9, rel=0.2)  # Binomial(N, q), not fixed
    counts = torch.zeros(200)
    for b in draws:
        counts[b] += 1
    assert counts.mean().item() == pytest.approx(50, rel=0.02) and counts.min() > 25
    # Seeded by the run's seed and the step: the same again, and a different seed differs.
    assert batches.epoch(7) == batches.epoch(7)
    other = PoissonBatches(examples, batches.view, 20, seed=4)
    assert other.epoch(7) != batches.epoch(7)


def test_a_logical_batch_is_laid_out_in_micro_batches_one_example_per_row():
    examples = random_examples(30)
    batches = PoissonBatches(examples, lambda items: PackedBatches(items, _layout(batch_tokens=60)), 12, seed=0)
    drawn = batches.epoch(0)[0]
    tensors = batches.tensors(drawn)
    micro = batches.micro_batches(tensors)
    assert len(micro) > 1
    seen = []
    for m in micro:
        assert m["input_ids"].numel() <= 60
        for row in m["seq_ids"]:
            ids = row[row >= 0].unique()
            assert len(ids) == 1  # one example per row
            seen.append(drawn[int(ids)])
    assert sorted(seen) == drawn
    assert batches.input_tokens(tensors) == sum(min(len(examples[i]["input_ids"]), ROW_LEN) for i in drawn)
    assert batches.micro_batches(batches.tensors([])) == []


# --- accounting -----------------------------------------------------------------------------------

def test_rdp_epsilon_of_the_gaussian_mechanism_matches_a_hand_computation():
    # With q = 1 every step is the Gaussian mechanism: RDP of order a is a / (2 sigma^2) per step,
    # and it composes by adding. Opacus turns RDP into (epsilon, delta) with Balle et al. 2020
    # (Theorem 21), which is tighter than the classic a * T / (2 sigma^2) + log(1/delta) / (a - 1).
    from opacus.accountants import RDPAccountant

    sigma, steps, delta = 2.0, 5, 1e-5
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = [steps * a / (2 * sigma**2) for a in orders]
    balle = min(r + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1) for a, r in zip(orders, rdp))
    classic = min(r + math.log(1 / delta) / (a - 1) for a, r in zip(orders, rdp))
    got = epsilon(sigma, 1.0, steps, delta, "rdp")
    assert got == pytest.approx(balle, rel=1e-9)
    # The classic form, minimised over all orders by hand: T / (2 sigma^2) + sqrt(2 T log(1/delta)) / sigma.
    assert classic == pytest.approx(steps / (2 * sigma**2) + math.sqrt(2 * steps * math.log(1 / delta)) / sigma,
                                    rel=1e-3)
    assert got < classic


def test_prv_epsilon_of_the_gaussian_mechanism_matches_its_exact_value():
    # T steps of the Gaussian mechanism with q = 1 are one Gaussian mechanism of sensitivity
    # sqrt(T) / sigma, whose exact delta(epsilon) is known (Balle and Wang 2018); PRV's epsilon is an
    # upper bound within its 0.01 error.
    sigma, steps, delta = 2.0, 5, 1e-5
    mu = math.sqrt(steps) / sigma
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731

    def exact_delta(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    lo, hi = 0.0, 50.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if exact_delta(mid) > delta else (lo, mid)
    got = epsilon(sigma, 1.0, steps, delta, "prv")
    assert hi <= got <= hi + 0.02
    assert got < epsilon(sigma, 1.0, steps, delta, "rdp")


def test_default_delta_is_one_over_n_rounded_down_to_a_power_of_ten_at_most_1e_5():
    assert default_delta(84) == 1e-5
    assert default_delta(100_000) == 1e-5
    assert default_delta(100_001) == 1e-6
    assert default_delta(1_000_000) == 1e-6
    assert default_delta(2_500_000) == 1e-7


def test_the_noise_for_a_target_epsilon_spends_it_over_the_planned_steps():
    config = PrivacyConfig(target_epsilon=3.0, expected_batch_size=50, accountant="rdp")
    budget = plan_budget(config, 1000, 200)
    assert budget.sample_rate == 0.05 and budget.delta == 1e-5
    assert 3.0 - 0.02 < budget.epsilon(200) <= 3.0
    assert budget.epsilon(100) < budget.epsilon(200)
    summary = budget.summary(200)
    assert summary["epsilon"] == budget.epsilon(200) and summary["noise_multiplier"] == budget.noise_multiplier
    given = plan_budget(PrivacyConfig(noise_multiplier=0.0, expected_batch_size=50, delta=1e-6), 1000, 10)
    assert given.summary(10)["epsilon"] is None and given.delta == 1e-6


def test_a_target_epsilon_out_of_reach_stops_with_what_to_change():
    config = PrivacyConfig(target_epsilon=0.01, expected_batch_size=8)
    with pytest.raises(TunesmithError) as err:
        plan_budget(config, 16, 400)
    (line,) = err.value.problems
    for fragment in ("privacy.target_epsilon: 0.01", "delta 1e-05", "400 steps", "16 training examples",
                     "expected_batch_size", "train.max_steps"):
        assert fragment in line, line


def test_one_process_only():
    refuse_processes(1)
    with pytest.raises(TunesmithError, match="one process, not 2"):
        refuse_processes(2)


# --- a private run, end to end --------------------------------------------------------------------

def _private_config(tmp_path, model_dir, data, **privacy):
    return write_config(tmp_path / "c.yaml", model_dir, data,
                        train={"max_steps": 6, "eval_every": 3, "save_every": 3, "packing": False, "lr": 0.02},
                        privacy={"expected_batch_size": 16, **privacy})


def test_a_private_run_trains_the_lora_weights_and_reports_epsilon(tmp_path, tiny_model_dir, review_data):
    from safetensors.torch import load_file

    from tunesmith.config import load_config
    from tunesmith.recipe import run_training

    path = _private_config(tmp_path, tiny_model_dir, review_data, target_epsilon=8.0)
    report = run_training(load_config(path))
    run = report.parent
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    lora_b = {n: w for n, w in adapter.items() if "lora_B" in n}
    assert lora_b and all(torch.isfinite(w).all() for w in adapter.values())
    # B starts at zero: every one of them moved (the #820 failure left updates wrong or missing).
    assert all(w.abs().sum() > 0 for w in lora_b.values())

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]
    privacy = metrics["privacy"]
    assert privacy["steps"] == 6 and privacy["accountant"] == "prv" and privacy["delta"] == 1e-5
    assert 0 < privacy["epsilon"] <= 8.0 and privacy["noise_multiplier"] > 0
    assert privacy["sample_rate"] == pytest.approx(16 / 84)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    spent = [r["epsilon"] for r in records if "val_loss" in r]
    assert len(spent) == 2 and 0 < spent[0] < spent[1] == pytest.approx(privacy["epsilon"])
    assert "## Privacy" in report.read_text() and "DP-SGD: epsilon" in report.read_text()


def test_a_private_run_interrupted_then_resumed_equals_one_straight_through(tmp_path, tiny_model_dir, review_data):
    # The batches are drawn from the seed and the step, and the noise and dropout from the random
    # state the checkpoint keeps: a resumed run trains exactly as an uninterrupted one.
    from safetensors.torch import load_file

    from tunesmith.config import load_config
    from tunesmith.recipe import run_training

    def run(name: str, interrupt_at: int | None = None) -> dict:
        path = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, review_data,
                            output={"dir": str(tmp_path / name)}, method={"dropout": 0.1},
                            train={"max_steps": 6, "eval_every": 3, "save_every": 100, "packing": False},
                            privacy={"noise_multiplier": 1.0, "expected_batch_size": 16})
        config = load_config(path)

        def stop(state):
            if state.step == interrupt_at:
                raise KeyboardInterrupt

        if interrupt_at:
            with pytest.raises(KeyboardInterrupt):
                run_training(config, on_step=stop)
            run_training(config, resume=True)
        else:
            run_training(config)
        privacy = json.loads((tmp_path / name / "metrics.json").read_text())["privacy"]
        return {**load_file(tmp_path / name / "adapter" / "adapter_model.safetensors"), "epsilon": privacy["epsilon"]}

    straight, resumed = run("straight"), run("resumed", interrupt_at=2)
    assert straight.keys() == resumed.keys()
    assert resumed.pop("epsilon") == straight.pop("epsilon") > 0
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


# --- bad input ------------------------------------------------------------------------------------



def test_privacy_with_packing_is_an_error(tmp_path, tiny_model_dir, review_data, capsys):
    path = _private_config(tmp_path, tiny_model_dir, review_data, noise_multiplier=1.0)
    err = cli_fails(capsys, ["train", str(path), "--set", "train.packing=true"],
                 "train.packing: false is required with privacy")
    assert len(err.strip().splitlines()) == 1


def test_privacy_with_a_method_without_per_example_gradients(tmp_path, tiny_model_dir, review_data, capsys):
    path = _private_config(tmp_path, tiny_model_dir, review_data, noise_multiplier=1.0)
    cli_fails(capsys, ["train", str(path), "--set", "method.name=qlora"],
           "method.name: qlora has no per-example gradients for private training")


def test_privacy_settings_are_checked_with_the_rest_of_the_config(tmp_path, tiny_model_dir, review_data, capsys):
    path = _private_config(tmp_path, tiny_model_dir, review_data, noise_multiplier=1.0, target_epsilon=3.0)
    err = cli_fails(capsys, ["train", str(path), "--set", "train.lr=-1"],
                 "privacy: give exactly one of target_epsilon and noise_multiplier", "train.lr")
    assert len(err.strip().splitlines()) == 2


def test_grad_accum_checkpointing_and_a_missing_batch_size_are_config_errors():
    data = {"path": "x.csv"}
    with pytest.raises(TunesmithError) as err:
        validate_config({"data": data, "train": {"packing": False, "grad_accum": 2, "activation_checkpointing": True},
                         "privacy": {"target_epsilon": 8, "expected_batch_size": 64}})
    assert err.value.problems == [
        "config: train.grad_accum: must be 1 with privacy: privacy.expected_batch_size sets the logical batch, "
        "and train.batch_tokens how it is split into micro-batches",
        "config: train.activation_checkpointing: not with privacy: torch.func's per-example gradients cannot run "
        "through checkpointed layers",
    ]
    with pytest.raises(TunesmithError) as err:
        validate_config({"data": data, "train": {"packing": False}, "privacy": {"target_epsilon": 8}})
    assert err.value.problems == ["config: privacy.expected_batch_size: Field required"]


def test_a_budget_impossible_with_the_data_stops_before_anything_is_written(tmp_path, tiny_model_dir,
                                                                           review_data, capsys):
    path = _private_config(tmp_path, tiny_model_dir, review_data, target_epsilon=0.001)
    err = cli_fails(capsys, ["train", str(path), "--set", "train.max_steps=500"], "privacy.target_epsilon: 0.001",
                 "cannot be met in 500 steps with 84 training examples")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_privacy_with_an_objective_without_a_per_example_loss(tmp_path, tiny_model_dir, review_data, capsys):
    path = _private_config(tmp_path, tiny_model_dir, review_data, noise_multiplier=1.0)
    cli_fails(capsys, ["train", str(path), "--set", "objective.name=classification"],
           "objective.name: private training needs a per-example loss", "objective classification")
    assert not (tmp_path / "run").exists()


def test_a_batch_larger_than_the_data(tmp_path, tiny_model_dir, review_data, capsys):
    path = _private_config(tmp_path, tiny_model_dir, review_data, noise_multiplier=1.0)
    cli_fails(capsys, ["train", str(path), "--set", "privacy.expected_batch_size=100"],
           "privacy.expected_batch_size: 100 is more than the 84 training examples")


# --- the README -----------------------------------------------------------------------------------

def test_the_readme_privacy_section_is_a_valid_config():
    section = (ROOT / "README.md").read_text().split("### Private training", 1)[1]
    snippet = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    demo = yaml.safe_load((ROOT / "examples" / "rotten_tomatoes_lora.yaml").read_text())
    config = validate_config({**demo, **snippet, "train": {**demo["train"], **snippet["train"]}})
    assert config.privacy.target_epsilon is not None and not config.train.packing


def test_a_private_config_round_trips(tmp_path, tiny_model_dir, review_data):
    from tunesmith.config import load_config, save_config

    config = load_config(_private_config(tmp_path, tiny_model_dir, review_data, target_epsilon=8.0))
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml").privacy == config.privacy

