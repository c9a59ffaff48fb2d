"""Bottleneck adapters: the base model at init, in the right places, on several architectures."""

from __future__ import annotations

import pytest
import torch

from tunesmith.errors import TunesmithError
from tunesmith.methods import REGISTRY
from tunesmith.methods.adapter import BottleneckAdapter
from tunesmith.objectives.lm_loss import token_losses
from tunesmith.data.batching import collate

ADAPTER = REGISTRY["adapter"]


def tiny_llama(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)).eval()


def _batch():
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": (ids := torch.randint(3, 300, (n,), generator=g).tolist()), "labels": ids}
                for n in (9, 14, 6)]
    return collate(examples, [[0, 1], [2]], 32, pad_id=0)


def _adapters(model):
    return [m for m in model.modules() if isinstance(m, BottleneckAdapter)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("position", ["ffn", "both"])
def test_adapters_start_as_the_base_model_and_only_they_train(arch, position, tiny_model_dir):
    model = tiny_llama(tiny_model_dir) if arch == "llama" else tiny_gpt2()
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    model = ADAPTER.apply(model, ADAPTER.options(adapter_size=8, adapter_position=position))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)

    assert len(_adapters(model)) == 2 * (2 if position == "both" else 1)
    adapter_params = {id(p) for a in _adapters(model) for p in a.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == adapter_params

    # Once the up-projections are not zero, every adapter changes the output.
    for adapter in _adapters(model):
        torch.nn.init.normal_(adapter.up.weight, std=0.1)
        with torch.no_grad():
            changed = model(input_ids=ids).logits
        assert not torch.allclose(changed, base)
        torch.nn.init.zeros_(adapter.up.weight)


def test_houlsby_adapters_follow_attention_and_feed_forward(tiny_model_dir):
    model = ADAPTER.apply(tiny_llama(tiny_model_dir), ADAPTER.options(adapter_position="both"))
    adapted = sorted(n.removesuffix(".adapter") for n, m in model.named_modules() if isinstance(m, BottleneckAdapter))
    assert adapted == [f"model.layers.{i}.{s}" for i in range(2) for s in ("mlp", "self_attn")]
    assert all(a.down.out_features == 64 and isinstance(a.act, torch.nn.GELU) for a in _adapters(model))


def test_direct_decoder_loss_equals_the_full_forward_loss(tiny_model_dir):
    model = ADAPTER.apply(tiny_llama(tiny_model_dir), ADAPTER.options(adapter_size=8,
                                                                  adapter_position="both", adapter_activation="relu"))
    for adapter in _adapters(model):
        torch.nn.init.normal_(adapter.up.weight, std=0.1)
    batch = _batch()
    fast, _ = token_losses(model, batch, direct=True)
    slow, _ = token_losses(model, batch, direct=False)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_unknown_target_lists_the_block_modules(tiny_model_dir):
    with pytest.raises(TunesmithError, match=r"'nope' matches no module in a transformer block; module names in "
                                             r"a block: self_attn, self_attn\.q_proj.*mlp\.down_proj"):
        ADAPTER.apply(tiny_llama(tiny_model_dir), ADAPTER.options(target_modules=["nope"]))


def test_architecture_without_a_named_mlp_needs_named_targets():
    # OPT's feed-forward block is two bare linears (fc1, fc2) in the decoder layer.
    with pytest.raises(TunesmithError, match=r"adapter found none of mlp, feed_forward, ffn.*fc2"):
        ADAPTER.apply(tiny_opt(), ADAPTER.options())
    cfg = ADAPTER.options(target_modules=["self_attn", "fc2"], adapter_size=4)
    model = ADAPTER.apply(tiny_opt(), cfg)
    assert len(_adapters(model)) == 4
    assert model(input_ids=torch.randint(3, 300, (1, 8))).logits.shape == (1, 8, 300)
