"""The speed options must not change the maths: accumulation, length-grouped batches, checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import random_examples
from tunesmith.train.options import TrainConfig
from tunesmith.data.format import IGNORE
from tunesmith.methods import get_method
from tunesmith.objectives.base import Layout
from tunesmith.objectives.causal import PackedBatches
from tunesmith.train.loop import apply_speed_options, fit
from tunesmith.train.precision import FORCE_ENV, autocast, forced_bf16, native_bf16, uses_bf16
from tunesmith.objectives.lm_loss import loss_sum
from tunesmith.data.batching import collate, plan_batches

ROW_LEN = 40


def _examples(n=24, seed=0):
    return random_examples(n, seed)


def _lora(model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # No dropout: its masks depend on batch shapes, which is what these tests vary.
    model = get_method("lora").apply(model, get_method("lora").options(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # B starts at zero, which would leave A without gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _first_step_grads(model_dir, tmp_path, batch_tokens: int, grad_accum: int) -> dict[str, torch.Tensor]:
    """The gradients the training loop hands to the optimizer at its first step."""
    from accelerate import Accelerator

    model = _lora(model_dir)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}

    def capture(optimizer, args, kwargs):
        if not seen:
            seen.update({names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"]})

    # float32: bf16 matmuls round differently for different batch shapes.
    cfg = TrainConfig(max_steps=1, batch_tokens=batch_tokens, grad_accum=grad_accum, max_grad_norm=None,
                      warmup_ratio=0.0, mixed_precision="no")
    batches = PackedBatches(_examples(), Layout(batch_tokens, ROW_LEN, pad_id=0, seed=0))
    handle = register_optimizer_step_pre_hook(capture)
    tmp_path.mkdir()
    try:
        fit(model, Accelerator(cpu=True), batches, [], cfg, tmp_path / "checkpoints")
    finally:
        handle.remove()
    return seen


def test_accumulating_4_micro_batches_gives_the_gradient_of_one_batch_4_times_as_large(tmp_path, tiny_model_dir):
    # One row per micro-batch, four accumulated, against four rows in one batch: the same rows,
    # since both plans shuffle the same rows with the same seed before cutting them into batches.
    accumulated = _first_step_grads(tiny_model_dir, tmp_path / "a", batch_tokens=ROW_LEN, grad_accum=4)
    whole = _first_step_grads(tiny_model_dir, tmp_path / "b", batch_tokens=4 * ROW_LEN, grad_accum=1)
    assert accumulated.keys() == whole.keys() and accumulated
    for name, grad in whole.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _epoch_loss_and_grads(model, examples, one_per_row: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    n_tokens = sum(sum(t != IGNORE for t in e["labels"][1:]) for e in examples)
    total = 0.0
    for rows in plan_batches(examples, 3 * ROW_LEN, ROW_LEN, seed=1, one_per_row=one_per_row):
        s, _ = loss_sum(model, collate(examples, rows, ROW_LEN, pad_id=0))
        (s / n_tokens).backward()
        total += s.detach()
    return total / n_tokens, _grads(model)


def test_length_grouped_batches_give_the_loss_and_gradient_of_packed_rows(tiny_model_dir):
    model = _lora(tiny_model_dir)
    examples = _examples()
    packed = plan_batches(examples, 3 * ROW_LEN, ROW_LEN, seed=1)
    assert any(len(row) > 1 for rows in packed for row in rows), "the packed plan must share rows"
    grouped = plan_batches(examples, 3 * ROW_LEN, ROW_LEN, seed=1, one_per_row=True)
    assert any(len({len(examples[i]["input_ids"]) for (i,) in rows}) > 1 for rows in grouped), \
        "some length-grouped batch must be right-padded"

    packed_loss, packed_grads = _epoch_loss_and_grads(model, examples, one_per_row=False)
    grouped_loss, grouped_grads = _epoch_loss_and_grads(model, examples, one_per_row=True)
    torch.testing.assert_close(grouped_loss, packed_loss, rtol=1e-5, atol=1e-6)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grouped_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    with torch.no_grad():
        on_packed = PackedBatches(examples, Layout(3 * ROW_LEN, ROW_LEN, pad_id=0, seed=0)).mean_loss(model, examples)
        on_grouped = PackedBatches(examples, Layout(3 * ROW_LEN, ROW_LEN, pad_id=0, seed=0, one_per_row=True)
                                   ).mean_loss(model, examples)
    assert on_grouped == pytest.approx(on_packed, rel=1e-5)


def test_activation_checkpointing_gives_the_same_gradients(tiny_model_dir):
    examples = _examples()
    plain = _lora(tiny_model_dir)
    checkpointed = _lora(tiny_model_dir)
    apply_speed_options(checkpointed, TrainConfig(activation_checkpointing=True))
    for model in (plain, checkpointed):
        model.train()
        for rows in plan_batches(examples, 3 * ROW_LEN, ROW_LEN, seed=None):
            s, n = loss_sum(model, collate(examples, rows, ROW_LEN, pad_id=0))
            (s / n).backward()
    expected = _grads(plain)
    got = _grads(checkpointed)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast_stays_close_to_float32(tiny_model_dir):
    model = _lora(tiny_model_dir)
    examples = _examples()
    batch = collate(examples, plan_batches(examples, 3 * ROW_LEN, ROW_LEN, seed=None)[0], ROW_LEN, pad_id=0)
    with torch.no_grad():
        s32, n = loss_sum(model, batch)
        with autocast("bf16", torch.device("cpu")):
            s16, _ = loss_sum(model, batch)
        with autocast("no", torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
    assert s16.dtype == torch.float32  # the loss itself is computed in float32
    torch.testing.assert_close(s16 / n, s32 / n, rtol=2e-2, atol=0)
    with autocast("auto", torch.device("cpu")):
        forced = forced_bf16()
        assert torch.is_autocast_enabled("cpu") == (native_bf16(torch.device("cpu")) if forced is None else forced)


def test_the_switch_makes_auto_choose_bf16_or_float32_on_any_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(FORCE_ENV, "1")
    assert uses_bf16("auto", cpu) and uses_bf16("bf16", cpu) and not uses_bf16("no", cpu)
    monkeypatch.setenv(FORCE_ENV, "0")
    assert not uses_bf16("auto", cpu) and uses_bf16("bf16", cpu) and not uses_bf16("no", cpu)
    monkeypatch.delenv(FORCE_ENV)
    assert uses_bf16("auto", cpu) == native_bf16(cpu)


def test_the_decoding_layout_moves_only_frozen_weights_and_changes_no_output_or_gradient(tiny_model_dir,
                                                                                        monkeypatch):
    from tunesmith.model import lay_out_for_decoding

    model, relaid = _lora(tiny_model_dir), _lora(tiny_model_dir)
    monkeypatch.setenv("TUNESMITH_DECODE_LAYOUT", "row")
    assert lay_out_for_decoding(relaid) == 0
    assert all(p.is_contiguous() for p in relaid.parameters())
    monkeypatch.delenv("TUNESMITH_DECODE_LAYOUT")
    frozen = [m.weight for m in relaid.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    assert frozen and lay_out_for_decoding(relaid) == len(frozen)
    assert all(w.t().is_contiguous() and not w.is_contiguous() for w in frozen)
    assert all(p.is_contiguous() for p in relaid.parameters() if p.requires_grad)
    assert lay_out_for_decoding(relaid) == 0  # a second call finds nothing left to move

    ids = torch.tensor([[5, 9, 14, 3, 7, 21], [8, 8, 2, 30, 11, 4]])
    for m in (model, relaid):
        m(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(relaid(input_ids=ids).logits, model(input_ids=ids).logits)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, p in relaid.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name])
    # One row at a time, with the KV cache: the decoding shape the layout is for.
    step = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(relaid.generate(input_ids=ids[:1], **step), model.generate(input_ids=ids[:1], **step))


def test_bfloat16_frozen_weights_are_packed_for_onednn_and_give_the_plain_layers_outputs(tiny_model_dir,
                                                                                      monkeypatch):
    """Where oneDNN runs bfloat16 (AVX512-BF16 or AMX), each frozen bfloat16 linear layer decodes through
    a packed copy of its weight: the same outputs as the plain layer within bfloat16's rounding, in a
    copy of the model too, with gradients still flowing to the trainable weights, and a weight changed
    in place packed again."""
    import copy

    from tunesmith.model import PackedLinear, lay_out_for_decoding, packs_bfloat16

    if not packs_bfloat16():
        pytest.skip("this CPU's oneDNN does not run bfloat16 natively: the layers stay plain")
    plain = _lora(tiny_model_dir).to(torch.bfloat16)
    monkeypatch.setenv("TUNESMITH_DECODE_LAYOUT", "column")  # the old layout: bfloat16 laid out as float32
    column = copy.deepcopy(plain)
    lay_out_for_decoding(column)
    assert not any(isinstance(m.forward, PackedLinear) for m in column.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.delenv("TUNESMITH_DECODE_LAYOUT")
    packed = copy.deepcopy(plain)
    frozen = [m for m in packed.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    assert frozen and lay_out_for_decoding(packed) == len(frozen) and lay_out_for_decoding(packed) == 0
    assert all(isinstance(m.forward, PackedLinear) for m in frozen)

    ids = torch.tensor([[5, 9, 14, 3, 7, 21], [8, 8, 2, 30, 11, 4]])
    with torch.no_grad():
        expected = plain(input_ids=ids).logits.float()
        torch.testing.assert_close(packed(input_ids=ids).logits.float(), expected, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(copy.deepcopy(packed)(input_ids=ids).logits.float(), expected,
                                   atol=2e-2, rtol=2e-2)
    for m in (plain, packed):  # training through a packed layer takes the plain path
        m(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert all(torch.equal(p.grad, grads[n]) for n, p in packed.named_parameters() if p.requires_grad)
    with torch.no_grad():  # a frozen weight changed in place after packing: packed again from its new values
        for m in (plain, packed):
            next(x for x in m.modules() if isinstance(x, torch.nn.Linear) and not x.weight.requires_grad).weight.mul_(-3)
        changed = plain(input_ids=ids).logits.float()
        assert not torch.allclose(changed, expected, atol=0.1)
        torch.testing.assert_close(packed(input_ids=ids).logits.float(), changed, atol=2e-2, rtol=2e-2)
