"""Every method (but qlora, which needs a GPU) on the tiny Llama: it learns, trains only its own
weights, saves and reloads to the same outputs, and merges to the same outputs where it can."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_config
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.methods import REGISTRY
from tunesmith.objectives.lm_loss import loss_sum, token_losses
from tunesmith.data.batching import collate, plan_batches

# case -> (method, options, learning rate)
CASES = {
    "full": ("full", {}, 3e-3),
    "lora": ("lora", {}, 0.05),
    "lora-dora": ("lora", {"use_dora": True}, 0.05),
    "lora-rslora": ("lora", {"use_rslora": True}, 0.05),
    "ia3": ("ia3", {}, 0.05),
    "prefix": ("prefix", {"num_virtual_tokens": 8}, 0.3),
    "prompt": ("prompt", {"prompt_init_text": "classify sentiment"}, 0.05),
    "ptuning": ("ptuning", {"num_virtual_tokens": 8}, 0.03),
    "adapter": ("adapter", {"adapter_position": "both"}, 0.05),
}
OPTIONS = {"r": 4, "alpha": 8, "dropout": 0.0, "num_virtual_tokens": 4, "adapter_size": 8}
ROW_LEN, BATCH_TOKENS = 64, 256


def _options(name, **options):
    """``name``'s options from ``options``, leaving out those the method does not take."""
    fields = REGISTRY[name].options.model_fields
    return REGISTRY[name].options(**{k: v for k, v in options.items() if k in fields})


def test_every_method_has_a_row():
    assert {method for method, _, _ in CASES.values()} == set(REGISTRY) - {"qlora"}


@pytest.fixture
def review_config(tmp_path, tiny_model_dir, review_data):
    return load_config(write_config(tmp_path / "c.yaml", tiny_model_dir, review_data))


@pytest.fixture
def encoded(review_config, tiny_tokenizer):
    from tunesmith.session import Session

    return Session(review_config).prepare().encoded


def _load_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def _batches(method, examples, seed):
    return plan_batches(examples, BATCH_TOKENS, ROW_LEN, seed, one_per_row=not method.packs)


@torch.no_grad()
def _losses(model, method, examples, pad_id, direct=None):
    """Per-token losses over ``examples``: the tuned model's outputs, compared across save/load/merge."""
    direct = method.direct_decoder if direct is None else direct
    return torch.cat([token_losses(model, collate(examples, rows, ROW_LEN, pad_id), direct)[0]
                      for rows in _batches(method, examples, seed=None)])


@pytest.mark.parametrize("case", CASES)
def test_method_learns_its_own_weights_saves_loads_and_merges(case, tmp_path, tiny_model_dir, tiny_tokenizer,
                                                              encoded):
    name, options, lr = CASES[case]
    method, pad_id = REGISTRY[name], tiny_tokenizer.pad_token_id
    train, held_out = encoded["train"], encoded["validation"]
    torch.manual_seed(0)
    model = _load_base(tiny_model_dir)
    base_weights = {id(p): p.detach().clone() for p in model.parameters()}
    model = method.apply(model, _options(name, **{**OPTIONS, **options}))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable.items()}
    if name != "full":
        assert not any(id(p) in base_weights for p in trainable.values()), "a base weight trains"

    before = _losses(model, method, held_out, pad_id).mean()
    optimizer = torch.optim.AdamW(trainable.values(), lr=lr)
    for rows in (_batches(method, train, seed=0) * 2)[:12]:
        s, n = loss_sum(model, collate(train, rows, ROW_LEN, pad_id), method.direct_decoder)
        (s / n).backward()
        optimizer.step()
        optimizer.zero_grad()
    tuned = _losses(model, method, held_out, pad_id)
    assert tuned.mean() < 0.95 * before

    for n, p in trainable.items():
        assert not torch.equal(p, start[n]), f"{n} did not train"
    for p in model.parameters():
        if id(p) in base_weights and not p.requires_grad:
            assert torch.equal(p, base_weights[id(p)]), "a frozen base weight changed"

    saved = tmp_path / "saved"
    method.save(model, saved)
    if name != "full":
        numel = sum(t.numel() for file in saved.glob("*.safetensors") for t in load_file(file).values())
        assert 0 < numel <= sum(p.numel() for p in trainable.values()), "the save holds base weights"
    reloaded = method.load(_load_base(tiny_model_dir), saved).eval()
    assert hasattr(reloaded, "disable_adapter") == method.disables  # the base without loading it again
    torch.testing.assert_close(_losses(reloaded, method, held_out, pad_id), tuned, rtol=0, atol=1e-6)

    if method.merge is not None:
        merged = method.merge(model)
        assert not hasattr(merged, "peft_config")
        torch.testing.assert_close(_losses(merged, method, held_out, pad_id, direct=True), tuned,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_run_training_with_each_method(case, tmp_path, tiny_model_dir, review_data):
    from tunesmith.evaluate import evaluate_run
    from tunesmith.recipe import run_training

    name, options, lr = CASES[case]
    # Rows long enough for two answers, so that scoring would pack them if the method allowed it.
    config = load_config(write_config(tmp_path / "c.yaml", tiny_model_dir, {**review_data, "max_length": 128},
                                      method=_options(name, **{**OPTIONS, **options}).model_dump(),
                                      train={"max_steps": 10, "lr": lr, "eval_every": 10}))
    run_training(config)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]
    _, tuned = evaluate_run(run)
    assert tuned["loss"] == pytest.approx(metrics["tuned"]["loss"], abs=1e-5)


def test_dora_and_rslora_reach_peft(tiny_model_dir):
    options = {"name": "lora", "r": 4, "alpha": 8}
    dora = REGISTRY["lora"].apply(_load_base(tiny_model_dir), REGISTRY["lora"].options(**options, use_dora=True))
    assert any("lora_magnitude_vector" in n for n, p in dora.named_parameters() if p.requires_grad)
    rslora = REGISTRY["lora"].apply(_load_base(tiny_model_dir), REGISTRY["lora"].options(**options, use_rslora=True))
    q_proj = rslora.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / 4**0.5)


def test_qlora_without_cuda_fails_at_config_load_with_the_other_problems(tmp_path, tiny_model_dir, review_data):
    if not REGISTRY["qlora"].check(REGISTRY["qlora"].options()):
        pytest.skip("this machine can run qlora")
    path = write_config(tmp_path / "c.yaml", tiny_model_dir, review_data, method={"name": "qlora"},
                        train={"lr": -1})
    with pytest.raises(TunesmithError) as err:
        load_config(path)
    problems = err.value.problems
    assert any("train.lr" in p for p in problems)
    assert any("method.name: qlora needs a CUDA GPU and the bitsandbytes package" in p for p in problems)


def test_qlora_refuses_a_base_model_that_is_not_quantised(tiny_model_dir):
    with pytest.raises(TunesmithError, match="4-bit"):
        REGISTRY["qlora"].apply(_load_base(tiny_model_dir), REGISTRY["qlora"].options())


@pytest.mark.parametrize("name", ["lora", "ia3", "adapter"])
def test_target_modules_that_match_nothing_list_the_module_names(name, tiny_model_dir):
    with pytest.raises(TunesmithError, match=r"method.target_modules: .*nope.* match.*q_proj.*"):
        REGISTRY[name].apply(_load_base(tiny_model_dir), REGISTRY[name].options(target_modules=["nope"]))


def test_ia3_without_default_targets_for_the_architecture_asks_for_them():
    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1))
    with pytest.raises(TunesmithError, match=r"no default \(IA\)³ targets for model type 'mamba'.*in_proj"):
        REGISTRY["ia3"].apply(mamba, REGISTRY["ia3"].options())
