"""serve/decoder.py: the engine's own forward pass of Llama-family models. Greedy answers equal
``generate``'s for rows of several adapters (LoRA on every linear layer, on some, or none) in one
batch, prefilled in chunks; the fused weights are the model's own (views, nothing copied or
changed); models and adapters it does not run go through transformers."""

from __future__ import annotations

import platform

import pytest
import torch

from tunesmith.errors import TunesmithError
from tunesmith import model as model_module
from tunesmith.model import lay_out_for_decoding, packs_for_decoding
from tunesmith.serve import decoder as decoder_module
from tunesmith.serve.decoder import LlamaDecoder, supported
from tunesmith.serve.engine import BASE, Caches, Event, Job, Sampling, decode

PROMPTS = ["the film was long", "a dull boring story about a dog and its", "the", "the cast was good and the ending"]


def lora_model(tiny_model_dir, dtype=torch.float32, **extra):
    """The tiny Llama with three LoRA adapters of random weights: ``every`` on every linear layer (r=4),
    ``some`` on q and v only (r=2, another alpha), ``mlp`` on gate and down (r=3)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(dtype)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, **extra),
                           adapter_name="every")
    model.add_adapter("some", LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False, **extra))
    model.add_adapter("mlp", LoraConfig(r=3, target_modules=["gate_proj", "down_proj"], init_lora_weights=False,
                                        **extra))
    for parameter in model.parameters():  # LoRA's random B is small; make each adapter change the answers
        if parameter.dim() == 2 and parameter.shape[1] <= 4:
            parameter.data.mul_(40)
    model.eval().requires_grad_(False)
    lay_out_for_decoding(model)
    return model


def alone(model, tokenizer, adapter: str, prompt: str, n: int) -> list[int]:
    ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, adapter_names=[adapter])
    return out[0, len(ids):].tolist()


def decoded(model, tokenizer, specs, **kwargs) -> list[list[int]]:
    """Each spec's (adapter, prompt, tokens) greedy tokens from ``engine.decode``, all in one batch."""
    tokens: list[list[int]] = [[] for _ in specs]

    def job(i, adapter, prompt, n):
        def emit(event: Event) -> None:
            assert event.kind != "error", event.text
            tokens[i].extend(t.token for t in event.logprobs)

        return Job(adapter, tokenizer(prompt).input_ids, Sampling(n, temperature=0, logprobs=0), emit=emit)

    decode(lambda job: (None, model, True), tokenizer, [job(i, *spec) for i, spec in enumerate(specs)], **kwargs)
    return tokens


@pytest.fixture
def spied(monkeypatch):
    """The decoder's passes, counted."""
    calls: list[int] = []
    forward = LlamaDecoder.forward
    monkeypatch.setattr(LlamaDecoder, "forward", lambda self, ids, *a, **k: calls.append(ids.shape[1]) or
                        forward(self, ids, *a, **k))
    return calls


X86_ONEDNN = torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.parametrize("layout", ["column", pytest.param("packed", marks=pytest.mark.skipif(
    not X86_ONEDNN, reason="float32 weights are packed for oneDNN on x86 CPUs only"))])
def test_rows_of_several_adapters_decode_what_generate_decodes_for_each_alone(tiny_model_dir, tiny_tokenizer, spied,
                                                                             layout, monkeypatch):
    """Four rows (an adapter on every linear layer, one on q and v, one on the MLP, the base), prompts of
    different lengths prefilled 4 tokens a pass and stopping at different lengths, so the batch goes
    from the stacked product of mixed rows to one adapter's own matrices: each row's tokens are
    ``generate``'s alone, and PEFT's LoRA modules never run. Both ways of running float32 products:
    torch's BLAS on column-major weights, and oneDNN on weights packed once (model.packs_for_decoding),
    whichever this CPU takes by default."""
    monkeypatch.setenv("TUNESMITH_DECODE_LAYOUT", layout)
    model = lora_model(tiny_model_dir)
    assert supported(model) is None
    specs = [("every", PROMPTS[0], 9), ("some", PROMPTS[1], 3), ("mlp", PROMPTS[2], 5), (BASE, PROMPTS[3], 4)]
    expected = [alone(model, tiny_tokenizer, *spec) for spec in specs]
    assert len({tuple(e) for e in expected[:3]}) == 3
    peft_calls: list[int] = []
    for module in model.modules():
        if hasattr(module, "lora_A"):
            for inner in module.lora_A.values():
                inner.register_forward_hook(lambda *args: peft_calls.append(1))
    assert decoded(model, tiny_tokenizer, specs, prefill_tokens=16) == expected
    assert spied and max(spied) == 4 and spied.count(1) >= 8 and not peft_calls
    layers, head = decoder_module._FUSED[model.base_model.model]
    assert all((product.packed is not None) == (layout == "packed") for product in [head, *layers[0].values()])
    # Each adapter alone (a lone request takes its adapter's own matrices).
    for spec, tokens in zip(specs, expected):
        assert decoded(model, tiny_tokenizer, [spec]) == [tokens]


@pytest.mark.skipif(not X86_ONEDNN, reason="float32 weights are packed for oneDNN on x86 CPUs only")
def test_weights_are_packed_only_where_a_copy_leaves_room(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """The tiny model's copy fits; a model whose copy would not (``_room_for_copy`` says so) decodes from
    its own weights, the same tokens."""
    monkeypatch.setenv("TUNESMITH_DECODE_LAYOUT", "packed")
    model = lora_model(tiny_model_dir)
    assert decoder_module._room_for_copy(model.base_model.model, 1)
    expected = alone(model, tiny_tokenizer, "every", PROMPTS[1], 5)
    monkeypatch.setattr(decoder_module, "_room_for_copy", lambda causal, scale: False)
    assert decoded(model, tiny_tokenizer, [("every", PROMPTS[1], 5)]) == [expected]
    layers, head = decoder_module._FUSED[model.base_model.model]
    assert head.packed is None and all(product.packed is None for product in layers[0].values())


def test_an_unknown_decode_layout_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("TUNESMITH_DECODE_LAYOUT", "colum")
    with pytest.raises(TunesmithError, match="TUNESMITH_DECODE_LAYOUT='colum': expected one of auto, column"):
        packs_for_decoding(torch.float32)


def test_the_fused_weights_are_the_models_own(tiny_model_dir, tiny_tokenizer):
    """After decoding, q, k and v (and gate and up) are views of one tensor, with the values they had;
    the model's own forward gives the same logits as before; a weight replaced since (as a merge does)
    is fused again, and decoding follows it."""
    model = lora_model(tiny_model_dir)
    attention = model.base_model.model.model.layers[0].self_attn
    before = {name: getattr(attention, name).base_layer.weight.clone() for name in ("q_proj", "k_proj", "v_proj")}
    ids = torch.tensor([tiny_tokenizer(PROMPTS[1]).input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    decoded(model, tiny_tokenizer, [("every", PROMPTS[0], 2)])
    weights = {name: getattr(attention, name).base_layer.weight for name in before}
    assert len({w.untyped_storage().data_ptr() for w in weights.values()}) == 1
    assert all(torch.equal(weights[name], before[name]) for name in before)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)

    attention.q_proj.base_layer.weight.data = before["q_proj"] * 3  # another tensor, as a merge leaves
    assert decoded(model, tiny_tokenizer, [("some", PROMPTS[1], 5)]) == [alone(model, tiny_tokenizer, "some",
                                                                                PROMPTS[1], 5)]
    assert attention.q_proj.base_layer.weight.untyped_storage().data_ptr() == \
        attention.k_proj.base_layer.weight.untyped_storage().data_ptr()


def test_models_and_adapters_it_does_not_run_go_through_transformers(tiny_model_dir, tiny_tokenizer, spied):
    """DoRA, another activation, a model that is not Llama, Mistral, Phi-3, Qwen2 or Qwen3, a rotary
    embedding on part of each head: ``supported`` names why, and the engine decodes them through
    transformers, as ``generate`` does."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    dora = lora_model(tiny_model_dir, use_dora=True)
    assert "not a plain LoRA" in supported(dora)
    assert "activation" in supported(LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32,
                                                                  num_hidden_layers=1, num_attention_heads=2,
                                                                  hidden_act="gelu")))
    assert "GPT2LMHeadModel" in supported(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2)))
    assert "part of each head" in supported(Phi3ForCausalLM(Phi3Config(
        hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, partial_rotary_factor=0.5)))
    ids = tiny_tokenizer(PROMPTS[0]).input_ids
    dora.set_adapter("some")  # PEFT cannot mix DoRA adapters in a batch: the server gives each a lane of its own
    with torch.no_grad():
        expected = dora.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                 pad_token_id=tiny_tokenizer.pad_token_id)[0, len(ids):].tolist()
    dora.set_adapter("every")
    assert decoded(dora, tiny_tokenizer, [("some", PROMPTS[0], 5)]) == [expected]
    assert not spied


def test_the_slower_path_is_logged_once_with_its_reason(tiny_model_dir, caplog):
    """A model that decodes through transformers says why in the server's log, once (not at every batch),
    and again when its adapters change."""
    from transformers import GPT2Config, GPT2LMHeadModel

    caplog.set_level("INFO", logger=decoder_module.__name__)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2))
    dora = lora_model(tiny_model_dir, use_dora=True)
    for _ in range(2):
        assert LlamaDecoder.of(gpt2) is None and LlamaDecoder.of(dora) is None
    said = [r.getMessage() for r in caplog.records if "slower" in r.getMessage()]
    assert len(said) == 2 and "GPT2LMHeadModel" in said[0] and "not a plain LoRA" in said[1]
    dora.delete_adapter("mlp")
    assert LlamaDecoder.of(dora) is None
    assert len([r for r in caplog.records if "slower" in r.getMessage()]) == 3


@pytest.mark.parametrize("kind", ["qwen2", "qwen2-windows", "qwen3", "mistral", "phi3", "gemma3", "llama-biases"])
def test_qwen2_mistral_and_biases_decode_what_generate_decodes(kind, tiny_tokenizer, spied):
    """Qwen2 (biases on q, k and v; then a window of 4 on its second layer only), Qwen3 (each head of q
    and k normed, with weights of its own, and biases), Mistral with a sliding window of 4 positions
    over prompts of up to 9 (the window's mask for every pass, a lone row's too), Phi-3 (q, k and v one
    layer, gate and up another; a window of 5), Gemma 3 (a local layer with a window of 4 and its own
    rotary table, a global one; four norms a layer and the heads' norms, all with weights made to
    count) and Llama with biases on every projection, each with two LoRA adapters: rows of both and the
    base give ``generate``'s greedy tokens."""
    from peft import LoraConfig, get_peft_model
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    shape = dict(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                 eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed({"qwen3": 1}.get(kind, 0))  # at 0, qwen3 ends a row at its end of sequence
    model = {"qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**shape)),
             "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**shape, head_dim=8, attention_bias=True)),
             "mistral": lambda: MistralForCausalLM(MistralConfig(**shape, sliding_window=4)),
             "qwen2-windows": lambda: Qwen2ForCausalLM(Qwen2Config(**shape, use_sliding_window=True, sliding_window=4,
                                                                   max_window_layers=1)),
             "phi3": lambda: Phi3ForCausalLM(Phi3Config(**shape, sliding_window=5)),
             "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**shape, head_dim=8, sliding_window=4,
                                                                  layer_types=["sliding_attention", "full_attention"])),
             "llama-biases": lambda: LlamaForCausalLM(LlamaConfig(**shape, attention_bias=True, mlp_bias=True))}[kind]()
    for name, module in model.named_modules():  # biases and norms initialise to zeros and ones: make them count
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.5)
        if name.endswith(("q_norm", "k_norm")) or (kind == "gemma3" and name.endswith("norm")):
            torch.nn.init.normal_(module.weight, mean=1, std=0.5)
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model.eval(), lora, adapter_name="every")
    model.add_adapter("some", lora)
    for parameter in model.parameters():
        if parameter.dim() == 2 and parameter.shape[1] <= 4:
            parameter.data.mul_(40)
    model.eval().requires_grad_(False)
    lay_out_for_decoding(model)
    assert supported(model) is None
    specs = [("every", PROMPTS[1], 6), ("some", PROMPTS[0], 8), (BASE, PROMPTS[3], 4)]
    expected = [alone(model, tiny_tokenizer, *spec) for spec in specs]
    assert len({tuple(e) for e in expected}) == 3
    assert decoded(model, tiny_tokenizer, specs, prefill_tokens=8) == expected
    assert decoded(model, tiny_tokenizer, specs[1:2]) == expected[1:2]  # alone: one row of one token a pass
    assert spied


def logits_both_ways(model, ids: torch.Tensor, adapter: str):
    """``model``'s logits of ``ids`` on ``adapter`` from the decoder (all but the last two tokens in one
    pass, then those one at a time, in a slot cache) and from transformers' forward, both float32,
    and the slots."""
    from tunesmith.serve.kvcache import SlotCache

    model.set_adapter(adapter)
    with torch.no_grad():
        reference = model(input_ids=ids).logits.float()
    slots = SlotCache()
    slots.reserve(1, ids.shape[1])
    decoder = LlamaDecoder.of(model)
    ours = [decoder.forward(ids[:, :-2], torch.tensor([0]), slots, 0, [adapter], keep=ids.shape[1] - 2)]
    for at in (ids.shape[1] - 2, ids.shape[1] - 1):
        ours.append(decoder.forward(ids[:, at:at + 1], torch.tensor([at]), slots, 0, [adapter]))
    return torch.cat(ours, dim=1), reference, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gemma3_logits_equal_transformers(tiny_tokenizer, dtype):
    """Gemma 3 on an adapter: the decoder's logits of a prompt longer than the window and of the next
    tokens one at a time are transformers' to float32's rounding, so each part counts (each kind's
    rotary table, GELU, the norms), not only what moves the greedy tokens; in bfloat16 (float32
    adapters, as the server loads them) to bfloat16's."""
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4, initializer_range=0.3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]))
    for name, module in model.named_modules():
        if name.endswith("norm"):
            torch.nn.init.normal_(module.weight, std=0.5)
    model = get_peft_model(model.eval(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                           adapter_name="every").eval().requires_grad_(False)
    as_served(model, dtype)
    ids = torch.tensor([tiny_tokenizer(PROMPTS[1]).input_ids])
    assert ids.shape[1] > 8
    ours, reference, _ = logits_both_ways(model, ids, "every")
    assert (ours - reference).abs().max() < (1e-4 if dtype is torch.float32 else 0.03) * reference.abs().max()
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.8


def test_transformers_forward_on_request(tiny_model_dir, tiny_tokenizer, monkeypatch, spied):
    """``TUNESMITH_DECODER=transformers`` decodes through transformers (to compare the two), the same tokens."""
    model = lora_model(tiny_model_dir)
    specs = [("every", PROMPTS[0], 5), (BASE, PROMPTS[1], 5)]
    ours = decoded(model, tiny_tokenizer, specs)
    assert spied
    spied.clear()
    monkeypatch.setenv("TUNESMITH_DECODER", "transformers")
    assert decoded(model, tiny_tokenizer, specs) == ours and not spied


def as_served(model, dtype: torch.dtype):
    """``model`` (PEFT) as the server serves it in ``dtype``: the base cast, row-major as loaded, and
    laid out for decoding; the adapters float32."""
    model.base_model.model.to(dtype)
    for module in model.modules():
        if hasattr(module, "lora_A"):
            module.lora_A.float()
            module.lora_B.float()
    for parameter in model.parameters():
        parameter.data = parameter.data.contiguous()
    lay_out_for_decoding(model)
    return model


def bfloat16_model(tiny_model_dir):
    """``lora_model`` as the server serves it in bfloat16."""
    return as_served(lora_model(tiny_model_dir), torch.bfloat16)


def widened(monkeypatch, wide: bool) -> None:
    """Decode bfloat16 weights as on a CPU without native bf16 (``model.widens_for_decoding``), on any."""
    if wide:
        monkeypatch.setattr(decoder_module, "widens_for_decoding", lambda dtype: dtype is torch.bfloat16)


@pytest.mark.parametrize("wide", [False, True], ids=["as-this-cpu", "widened"])
def test_bfloat16_logits_equal_transformers_to_bfloat16s_rounding(tiny_model_dir, tiny_tokenizer, monkeypatch, wide):
    """A bfloat16 base with float32 adapters (as the server loads them): the decoder's logits of a prompt
    and of the next tokens one at a time, in a bfloat16 cache, are transformers' to within bfloat16's
    rounding (its sums run in another order, so not bit for bit: the float32 tests compare tokens).
    Both as this CPU decodes bfloat16 and as one without native bf16 does (``widened``: one row on the
    2-byte weights, the prompt on their float32 copy)."""
    widened(monkeypatch, wide)
    model = bfloat16_model(tiny_model_dir)
    ids = torch.tensor([tiny_tokenizer(PROMPTS[1]).input_ids])
    ours, reference, slots = logits_both_ways(model, ids, "every")
    assert {t.dtype for t in slots.keys} == {torch.bfloat16}
    assert (ours - reference).abs().max() < 0.03 * reference.abs().max()
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.8
    layers, head = decoder_module._FUSED[model.base_model.model]
    assert not wide or all(product.wide for product in [head, *layers[0].values()])


def test_two_byte_weights_stay_row_major_where_bf16_is_not_native(monkeypatch):
    """On a CPU without native bf16, bfloat16 weights keep the row-major layout torch's own one-row
    product reads at speed (column-major ran a lone request's step 9x slower); float32 ones are laid
    out column-major as before."""
    monkeypatch.setattr(model_module, "packs_bfloat16", lambda: False)
    layer = torch.nn.Linear(8, 6, bias=False).requires_grad_(False)
    wide = torch.nn.Linear(8, 6, bias=False).requires_grad_(False).to(torch.bfloat16)
    lay_out_for_decoding(torch.nn.Sequential(layer, wide))
    assert layer.weight.stride() == (1, 6) and wide.weight.is_contiguous()


def test_two_byte_weights_decode_one_row_on_themselves_and_several_on_a_float32_copy(
        tiny_model_dir, tiny_tokenizer, spied, monkeypatch):
    """Where bf16 is not native (``widened`` here on every CPU), a bfloat16 model's products of one row
    run on its own row-major weights and those of several rows (prefill, a batch) on a float32 copy,
    sums rounded to bfloat16 either way: each row of a batch decodes the tokens it decodes alone. (Rows
    of one adapter: rows of several round each delta to bfloat16 first, as PEFT's mixed batches do, so
    their tokens may differ from alone in bfloat16 whichever way the products run.)"""
    widened(monkeypatch, True)
    model = bfloat16_model(tiny_model_dir)
    specs = [("every", PROMPTS[0], 6), ("every", PROMPTS[1], 4), ("every", PROMPTS[3], 5)]
    expected = [decoded(model, tiny_tokenizer, [spec])[0] for spec in specs]
    assert decoded(model, tiny_tokenizer, specs, prefill_tokens=16) == expected
    assert max(spied) > 1 and spied.count(1) >= 4
    layers, head = decoder_module._FUSED[model.base_model.model]
    for product in [head, *layers[0].values()]:
        copy = product.packed if product.packed is not None else product.float32
        assert product.wide and product.weight.dtype is torch.bfloat16 and copy.dtype is torch.float32
        assert product.packed is not None or copy.shape == product.weight.shape
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert q_proj.dtype is torch.bfloat16 and q_proj.data_ptr() == layers[0]["qkv"].weight.data_ptr()


def test_the_decoder_is_kept_until_the_adapters_change(tiny_model_dir, tiny_tokenizer):
    """A request on an idle server finds the decoder made for the last one (making it again cost 75-85
    ms a request on SmolLM2); an adapter's weights written in place, an adapter unloaded, or loaded
    again under its name with other weights make a new one, which decodes what ``generate`` does."""
    from peft import LoraConfig

    model = lora_model(tiny_model_dir)
    spec = ("some", PROMPTS[1], 6)
    first = LlamaDecoder.of(model)
    assert decoded(model, tiny_tokenizer, [spec]) == [alone(model, tiny_tokenizer, *spec)]
    assert LlamaDecoder.of(model) is first

    with torch.no_grad():  # written in place, as a reload into the same tensors would
        for module in model.modules():
            if "some" in getattr(module, "lora_B", {}):
                module.lora_B["some"].weight.mul_(-1)
    changed = alone(model, tiny_tokenizer, *spec)
    assert decoded(model, tiny_tokenizer, [spec]) == [changed]
    second = LlamaDecoder.of(model)
    assert second is not first

    model.delete_adapter("some")
    assert LlamaDecoder.of(model) is not second
    torch.manual_seed(1)
    model.add_adapter("some", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    for name, parameter in model.named_parameters():
        if "lora_B.some" in name:
            parameter.data.mul_(40)
    model.eval().requires_grad_(False)
    again = alone(model, tiny_tokenizer, *spec)
    assert again != changed and decoded(model, tiny_tokenizer, [spec]) == [again]


def test_the_rotary_table_is_transformers(tiny_model_dir):
    """The decoder's cos and sin of each position are those transformers computes, the sign of
    ``rotate_half`` folded into sin's first half."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    table = LlamaDecoder.of(model)._table(40, "cpu")
    positions = torch.arange(40)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    half = sin.shape[-1] // 2
    assert torch.equal(table[:, 0], cos[0])
    assert torch.equal(table[:, 1, half:], sin[0, :, half:]) and torch.equal(table[:, 1, :half], -sin[0, :, :half])
    assert decoder_module.ROTARY_TYPES >= {model.model.rotary_emb.rope_type}


@pytest.mark.slow
def test_smollm2_rows_of_two_adapters_decode_what_generate_decodes(spied):
    """The bundled SmolLM2-135M with two LoRA adapters of random weights on every linear layer, float32,
    laid out as the server lays it out: a batch of three chat prompts on the two adapters and the base
    gives each row ``generate``'s 16 greedy tokens alone, through the decoder."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.model import load_model, load_tokenizer, resolve_model

    source = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    model = load_model(source).float().eval()
    lora = LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, lora, adapter_name="alpha")
    model.add_adapter("beta", lora)
    model.eval().requires_grad_(False)
    lay_out_for_decoding(model)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
               for text in ("Was the film any good?", "Name a film about a dog.", "Hello!")]
    specs = [("alpha", prompts[0], 16), ("beta", prompts[1], 16), (BASE, prompts[2], 16)]
    ends = {tokenizer.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])}
    expected = []
    for adapter, prompt, n in specs:  # generate's own stop at the end of sequence, as the engine's
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, adapter_names=[adapter])[0, len(ids):].tolist()
        cut = [i for i, t in enumerate(out) if t in ends]
        expected.append(out[:cut[0]] if cut else out)
    assert decoded(model, tokenizer, specs) == expected
    assert len({tuple(e) for e in expected}) == 3 and spied
