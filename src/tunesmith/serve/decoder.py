"""A forward pass of Llama-family models written for the engine: fewer, larger ops than transformers'.

Why. A lone request's decoding step on SmolLM2-135M (2-vCPU Xeon, float32, LoRA on every linear
layer) took 43 ms, of which the matrix products were 24 ms (the time to read the weights: the memory
roofline) and the other 19 ms the cost of about 1,700 small ops and the Python around them
(docs/serving.md, "Where a lone request's step goes"): transformers' layers are written for every
model and for training, PEFT's wrap each projection in four modules, and each of those is an
``nn.Module`` call. ``torch.compile`` did not pay for it on CPU (104 s to compile, and slower).

This module runs the same computation with about 25 ops a layer and no module calls:
- q, k and v are one product, and gate and up another: their weights are laid side by side once
  (``fuse``), and the model's own layers are pointed at their parts of it, so nothing is copied
  and anything that reads a layer's weight (PEFT, merging, export) reads what it read before;
- each fused product adds every row's LoRA delta through ``lora_rows.StackedLora`` (one stacked
  product for rows of several adapters, the adapter's own two matrices for rows of one);
- the residual sums ride on the base products (``addmm``), rotary embeddings rotate q and k together
  from a table of positions, attention reads the ``SlotCache`` through one ``scaled_dot_product_attention``
  (grouped keys and values not repeated), and only the positions whose logits are asked for go
  through the final norm and the output layer.

It serves transformers' Gemma 3, Llama, Mistral, Phi-3, Qwen2 and Qwen3 causal LMs (``supported`` says
which: SiLU or Gemma's GELU, a rotary embedding fixed by position, on every feature of a head), with
plain LoRA linear layers on their projections or no adapter at all; any other model or adapter kind decodes
through transformers and PEFT as before (``engine.Lane``). Greedy answers equal ``generate``'s
(tests/test_serve_decoder.py).
"""

from __future__ import annotations

import logging
import os
import weakref
from functools import partial

import torch
import torch.nn.functional as F

from tunesmith.model import packs_for_decoding, unwrap, widens_for_decoding
from tunesmith.serve.held import Held
from tunesmith.serve.kvcache import SlotCache, attention_masks
from tunesmith.serve.lora_rows import StackedLora, stackable

log = logging.getLogger(__name__)

ROTARY_TYPES = {"default", "linear", "llama3"}  # rotary embeddings that depend on the position alone
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "qkv_proj", "gate_up_proj")  # the last two: Phi-3's, fused in the checkpoint


def _base(module) -> torch.nn.Linear:
    """The plain linear layer under a PEFT layer (or the layer itself)."""
    return getattr(module, "base_layer", module)


def fuse(modules: list) -> torch.Tensor:
    """One weight for linear layers that read the same input, their outputs side by side, as a matrix
    ``x`` multiplies on the right (``x @ fused``); each layer's weight becomes a view of its part, so
    the memory is not doubled. The layers' layout is kept (``model.lay_out_for_decoding``):
    column-major weights give a contiguous ``fused``, row-major ones (bfloat16 packed for oneDNN,
    or ``TUNESMITH_DECODE_LAYOUT=row``) a transposed view."""
    weights = [_base(m).weight for m in modules]
    if len(weights) == 1:
        return weights[0].t()
    column_major = all(w.stride(0) == 1 and w.dim() == 2 and w.shape[1] > 1 for w in weights)
    with torch.no_grad():
        if column_major:
            fused = torch.cat([w.t() for w in weights], dim=1)  # in x out, contiguous
            parts = fused.split([w.shape[0] for w in weights], dim=1)
            for w, part in zip(weights, parts):
                w.data = part.t()
            return fused
        fused = torch.cat([w.contiguous() for w in weights])  # out x in, contiguous
        for w, part in zip(weights, fused.split([w.shape[0] for w in weights])):
            w.data = part
        return fused.t()


class _Fused:
    """The base product of one linear layer, or of several fused (``fuse``). ``pack``: through oneDNN,
    the weight packed once (a copy); ``wide``: 2-byte weights on a CPU without native bf16, products of
    several rows on a float32 copy (``model.widens_for_decoding``), packed if ``pack``."""

    def __init__(self, modules: list, pack: bool, wide: bool = False):
        self.weight = fuse(modules)  # x @ weight
        self.bases = [_base(m) for m in modules]
        self.pointers = [b.weight.data_ptr() for b in self.bases]
        self.sizes = [b.weight.shape[0] for b in self.bases]
        self.bias = None  # of the layers side by side (zeros for a layer without), if any has one
        if any(b.bias is not None for b in self.bases):
            self.bias = torch.cat([b.bias.detach() if b.bias is not None else self.weight.new_zeros(b.weight.shape[0])
                                   for b in self.bases])
        # _fused_products decides both once per model (model.packs_for_decoding, widens_for_decoding,
        # the free memory).
        self.wide = wide
        source = self.weight.float() if wide else self.weight  # float32 of 2-byte weights: a copy, in x out
        self.packed = self.float32 = None
        if pack:  # oneDNN's own blocked layout, packed once (a copy), as model.PackedLinear does for one layer
            self.packed = torch.ops.mkldnn._reorder_linear_weight(source.t().contiguous())
        elif wide:  # several rows: x @ float32
            self.float32 = source.contiguous()

    def current(self, modules: list) -> bool:
        """Whether ``modules`` still hold the weights fused here (none was replaced since)."""
        return all(_base(m) is b and b.weight.data_ptr() == p for m, b, p in zip(modules, self.bases, self.pointers))

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if self.wide:
            return self._widened(x, residual)
        if self.packed is not None:
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        elif self.bias is not None:
            out = torch.addmm(self.bias, x, self.weight)
        elif residual is not None:
            return torch.addmm(residual, x, self.weight)
        else:
            return x @ self.weight
        return out if residual is None else out.add_(residual)

    def _widened(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """One row on the 2-byte weights, several on their float32 copy, the sums rounded to 2 bytes
        either way; then the bias and the residual, each rounded, as transformers adds them."""
        if x.shape[0] == 1:
            out = x @ self.weight
        elif self.packed is not None:
            out = torch.ops.mkldnn._linear_pointwise(x.float(), self.packed, None, "none", [], "").to(x.dtype)
        else:
            out = (x.float() @ self.float32).to(x.dtype)
        if self.bias is not None:
            out.add_(self.bias)
        return out if residual is None else out.add_(residual)


class _Projection:
    """One product of the decoder, with the LoRA of its layers as they are now."""

    def __init__(self, fused: _Fused, modules: list):
        self.fused, self.sizes = fused, fused.sizes
        self.lora = StackedLora(*modules) if any(hasattr(m, "lora_A") for m in modules) else None

    def __call__(self, x: torch.Tensor, names: list[str] | str, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (rows x features) through the layers, plus ``residual`` if given, plus each row's LoRA
        delta (``names``: one adapter per row, or every row's)."""
        lora = self.lora
        if lora is None:
            return self.fused(x, residual)
        # A base in lower precision than its adapter (bfloat16 and float32), or with a bias, sums as
        # transformers does: the product and bias, the delta (lora_rows.StackedLora.add), then the
        # residual; otherwise the residual rides on the base product, and the delta on it in place.
        late = residual is not None and (self.fused.weight.dtype != lora.A.dtype or self.fused.bias is not None)
        out = lora.add(self.fused(x, None if late else residual), x, names)
        return out.add_(residual) if late else out


_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a model: its layers' _Fused by group, its head's


def _groups(layer) -> dict[str, list]:
    attention, mlp = layer.self_attn, layer.mlp
    if hasattr(attention, "qkv_proj"):  # Phi-3: q, k and v are one layer, and gate and up another
        return {"qkv": [attention.qkv_proj], "o": [attention.o_proj], "gate_up": [mlp.gate_up_proj],
                "down": [mlp.down_proj]}
    return {"qkv": [attention.q_proj, attention.k_proj, attention.v_proj], "o": [attention.o_proj],
            "gate_up": [mlp.gate_proj, mlp.up_proj], "down": [mlp.down_proj]}


class _Norm:
    """An RMS norm: Llama's (``F.rms_norm`` in the model's dtype; ``scaled_after``: normed, rounded, then
    times the weight, as transformers rounds Qwen3's head norms), or Gemma's (in float32, times 1 + its
    weight, rounded once, as transformers does). ``weight``: one that is not the module's own (the
    stacked weights of q's and k's head norms); Gemma's 1 + weight is made here, once (a norm's weight
    written in place later is seen by Llama's norms, not by these copies: serving does not write them)."""

    def __init__(self, module, gemma: bool, weight: torch.Tensor | None = None, scaled_after: bool = False):
        self.gemma, self.scaled_after = gemma, scaled_after
        self.eps = module.eps if gemma else module.variance_epsilon
        weight = module.weight if weight is None else weight
        self.weight = 1 + weight.float() if gemma else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemma:
            return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).mul_(self.weight).to(x.dtype)
        if self.scaled_after:
            return F.rms_norm(x, (x.shape[-1],), None, self.eps).mul_(self.weight)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class _Layer:
    def __init__(self, layer, fused: dict[str, _Fused], gemma: bool):
        groups = _groups(layer)
        self.qkv, self.o, self.gate_up, self.down = (_Projection(fused[k], groups[k])
                                                     for k in ("qkv", "o", "gate_up", "down"))
        # Llama's two norms; Gemma's four: before and after attention, before and after the MLP.
        names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm")[:4 if gemma else 2]
        self.norms = [_Norm(getattr(layer, name), gemma) for name in names]
        sizes = self.gate_up.sizes  # gate's and up's widths: Phi-3's one layer holds both, gate first
        self.gate_up_sizes = sizes if len(sizes) == 2 else [sizes[0] // 2] * 2
        attention = layer.self_attn
        self.index = attention.layer_idx
        layer_types = getattr(attention.config, "layer_types", None)
        self.kind = layer_types[self.index] if layer_types else "full_attention"  # its mask and rotary table
        # Qwen3 and Gemma 3: q's and k's heads each normed (over a head's features) before the rotation,
        # one weight for q's heads and one for k's, stacked once so one norm does both.
        self.head_norm = None
        if hasattr(attention, "q_norm"):
            heads, kv_heads = attention.config.num_attention_heads, attention.config.num_key_value_heads
            stacked = torch.cat([attention.q_norm.weight.expand(heads, -1),
                                 attention.k_norm.weight.expand(kv_heads, -1)])
            self.head_norm = _Norm(attention.q_norm, gemma, stacked, scaled_after=True)


def _fused_products(causal) -> tuple[list[dict[str, _Fused]], _Fused]:
    """Each layer's fused products and the output layer's product, made at the first call on ``causal``
    and again only if a weight was replaced since (a merge, a reload)."""
    kept = _FUSED.get(causal)
    layers = [_groups(layer) for layer in causal.model.layers]
    if kept is None or not kept[1].current([causal.lm_head]) or \
            not all(kept[0][i][k].current(g) for i, groups in enumerate(layers) for k, g in groups.items()):
        weight = causal.lm_head.weight
        cpu = weight.device.type == "cpu"
        wide = cpu and widens_for_decoding(weight.dtype) and _room_for_copy(causal, 2)
        pack = cpu and packs_for_decoding(torch.float32 if wide else weight.dtype) and \
            (wide or _room_for_copy(causal, 1))  # the float32 copy packed, or a packed copy of its own
        kept = ([{k: _Fused(g, pack, wide) for k, g in groups.items()} for groups in layers],
                _Fused([causal.lm_head], pack, wide))
        _FUSED[causal] = kept
    return kept


def _room_for_copy(causal, scale: int) -> bool:
    """Whether a copy of the model's weights (``_Fused``), ``scale`` times their size (2: float32 of
    2-byte weights), leaves at least half of the memory that was free: a model that fits only once
    decodes from its own weights, slower, rather than not at all."""
    weights = scale * sum(p.numel() * p.element_size() for p in causal.parameters())
    try:
        with open("/proc/meminfo") as info:
            free = next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return True
    if weights <= free / 2:
        return True
    log.warning("decoding from the model's own weights: a copy of them (%.1f GB) would leave under half of "
                "the %.1f GB free", weights / 1e9, free / 1e9)
    return False


def _llama_family(causal) -> bool:
    """Whether ``causal`` is one of transformers' classes whose layers compute what this module computes
    (Qwen2: biases on q, k and v; Qwen3: a norm of each head of q and k before the rotation; Mistral:
    a sliding window, which the mask applies; Phi-3: q, k and v one layer, gate and up another, and a
    sliding window; Gemma 3: ``_gemma``)."""
    from transformers import (Gemma3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM,
                              Qwen2ForCausalLM, Qwen3ForCausalLM)

    return type(causal) in (Gemma3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM,
                            Qwen2ForCausalLM, Qwen3ForCausalLM)


def _gemma(causal) -> bool:
    """Whether ``causal`` is Gemma 3's text model: its embeddings scaled, four norms a layer (each
    block's output normed before the residual adds it), norms that scale by 1 + their weight in float32,
    GELU (tanh), and a rotary table for local (sliding-window) layers and another for global ones."""
    from transformers import Gemma3ForCausalLM

    return type(causal) is Gemma3ForCausalLM


def _rotary(rotary, kind: str) -> tuple[torch.Tensor, float]:
    """The inverse frequencies and scale of layers of attention ``kind``: Gemma 3 has a table per kind."""
    if hasattr(rotary, f"{kind}_inv_freq"):
        return getattr(rotary, f"{kind}_inv_freq"), getattr(rotary, f"{kind}_attention_scaling")
    return rotary.inv_freq, rotary.attention_scaling


def supported(model) -> str | None:
    """Why ``LlamaDecoder`` cannot run ``model``, or None when it can."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    causal = unwrap(model)
    if not _llama_family(causal):
        return f"{type(causal).__name__} is not transformers' Gemma 3, Llama, Mistral, Phi-3, Qwen2 or Qwen3"
    config = causal.config
    if _gemma(causal):
        if config.hidden_activation != "gelu_pytorch_tanh":
            return f"activation {config.hidden_activation}"
        if config.final_logit_softcapping or config.attn_logit_softcapping or config.use_bidirectional_attention:
            return "logit soft-capping or bidirectional attention"
    elif getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act}"
    rotary = causal.model.rotary_emb
    rope = getattr(rotary, "rope_type", "default")
    types = rope.values() if isinstance(rope, dict) else [rope]
    if not set(types) <= ROTARY_TYPES:
        return f"rotary embedding {rope}"
    kinds = set(getattr(config, "layer_types", None) or ("full_attention",))
    if any(2 * _rotary(rotary, kind)[0].numel() != causal.model.layers[0].self_attn.head_dim for kind in kinds):
        return "a rotary embedding on part of each head (partial_rotary_factor)"
    for name, module in causal.named_modules():
        if isinstance(module, BaseTunerLayer) and not (name.rsplit(".", 1)[-1] in PROJECTIONS and stackable(module)):
            return f"{name}: {type(module).__name__}, not a plain LoRA linear layer on a projection"
    if isinstance(model, PeftModel) and any(c.peft_type != "LORA" for c in model.peft_config.values()):
        return "an adapter other than LoRA"
    if any(isinstance(m, AuxiliaryTrainingWrapper) for m in causal.modules()):
        return "modules_to_save or trainable tokens"
    return None


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a model: (_adapters, its LlamaDecoder or None)
_TOLD: weakref.WeakSet = weakref.WeakSet()  # models of other architectures whose slower path was logged
SLOWER = "decoding through transformers, slower than the engine's own forward pass: %s"


def _adapters(model) -> list:
    """What a decoder of a model is made from besides the base weights (``_Fused.current`` checks those):
    each adapter's configuration and every projection's LoRA weights (``Held``: by identity, so none
    can be freed and another take its id), their in-place versions and scales, and whether a layer was
    merged. Equal lists are the same adapters."""
    marks = [(name, Held(config)) for name, config in getattr(model, "peft_config", {}).items()]
    for layer in unwrap(model).model.layers:
        for modules in _groups(layer).values():
            for module in modules:
                marks.append((Held(module), tuple(getattr(module, "merged_adapters", ()))))
                for name in getattr(module, "lora_A", {}):
                    for weight in (module.lora_A[name].weight, module.lora_B[name].weight):
                        marks.append((name, Held(weight), weight._version))
                    marks.append(module.scaling[name])
    return marks


class LlamaDecoder:
    """``forward`` of a Llama-family model over ``SlotCache`` slots, as ``engine.Lane`` runs it, with the
    model's adapters as they are now. ``of`` makes one per model and keeps it until the model's adapters
    change (one loaded, unloaded, merged or written to), so a request on an idle server does not wait
    for it to be made again (75-85 ms on SmolLM2 with LoRA on every linear layer, 2-vCPU AMD EPYC); the
    fused weights are made once per model and kept too."""

    def __init__(self, model):
        causal = unwrap(model)
        self.config = causal.config
        self.embed = causal.model.embed_tokens  # Gemma's scales what it looks up
        self.gemma = _gemma(causal)
        self.norm = _Norm(causal.model.norm, self.gemma)
        self.act = partial(F.gelu, approximate="tanh") if self.gemma else F.silu
        self.rotary = causal.model.rotary_emb
        attention = causal.model.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.heads = self.config.num_attention_heads
        self.kv_heads = self.config.num_key_value_heads
        self.scaling = attention.scaling
        self.dtype = self.embed.weight.dtype
        # A sliding window needs the mask even for one row of one token (kvcache.attention_masks).
        self.windowed = bool(getattr(self.config, "sliding_window", None)) and \
            set(getattr(self.config, "layer_types", None) or ()) != {"full_attention"}
        self.fused = _fused_products(causal)  # the same object until a weight is replaced
        self.layers = [_Layer(layer, products, self.gemma)
                       for layer, products in zip(causal.model.layers, self.fused[0])]
        self.head = self.fused[1]
        self.kinds = {layer.kind for layer in self.layers}  # of attention: full, sliding window
        self._tables: dict[str, torch.Tensor] = {}  # a rotary table per attention kind (_table)

    @classmethod
    def of(cls, model) -> LlamaDecoder | None:
        """A decoder for ``model``, or None where it cannot run it (``supported``) or where
        ``TUNESMITH_DECODER=transformers`` asks for transformers' forward (to compare the two)."""
        causal = unwrap(model)
        if os.environ.get("TUNESMITH_DECODER", "auto") == "transformers":
            return None
        if not _llama_family(causal):
            if causal not in _TOLD:  # once per model
                _TOLD.add(causal)
                log.info(SLOWER, supported(model))
            return None
        adapters, kept = _adapters(model), _DECODERS.get(model)
        if kept is not None and kept[0] == adapters and (kept[1] is None or kept[1].fused is _fused_products(causal)):
            return kept[1]
        why = supported(model)
        if why is not None:  # once per change of the adapters
            log.info(SLOWER, why)
        decoder = None if why is not None else cls(model)
        _DECODERS[model] = (adapters, decoder)
        return decoder

    def _table(self, length: int, device, kind: str = "full_attention") -> torch.Tensor:
        """cos and sin of every position below ``length`` (grown in whole slots' lengths) for layers of
        attention ``kind``, the second half's sin negated: ``rotate_half(x) * sin == x.roll(half) * signed_sin``."""
        table = self._tables.get(kind, torch.empty(0))
        if table.shape[0] < length:
            inv_freq, scale = _rotary(self.rotary, kind)
            positions = torch.arange(max(length, 2 * table.shape[0]), dtype=torch.float32)
            freqs = positions[:, None] * inv_freq.float()[None, :].cpu()  # as transformers computes them
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos() * scale, emb.sin() * scale
            half = self.head_dim // 2
            sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
            table = self._tables[kind] = torch.stack((cos, sin)).to(device, self.dtype).transpose(0, 1)
        return table  # positions x 2 x dim

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, starts: torch.Tensor, slots: SlotCache, first: int,
                adapters: list[str], keep: int | torch.Tensor = 1) -> torch.Tensor:
        """Logits (float32) of positions ``keep`` of a chunk: ``ids`` (rows x tokens) in slots ``first``..,
        each row from position ``starts[row]``, each on its adapter (``adapters``, ``engine.BASE`` for
        none); ``keep`` is an index tensor into the chunk's positions, or a count of the last ones."""
        rows, tokens = ids.shape
        device = self.embed.weight.device
        width = slots.bind(first, starts, tokens)
        names: list[str] | str = adapters[0] if len(set(adapters)) == 1 else list(adapters)
        masks = None  # one for every layer, or one per attention kind (full, sliding window)
        if rows > 1 or tokens > 1 or self.windowed:
            masks = attention_masks(self.config, starts, tokens, width, self.dtype)
            masks = {k: m.to(device) for k, m in masks.items()} if isinstance(masks, dict) else masks.to(device)
        positions = (starts[:, None] + torch.arange(tokens)).to(device)
        rotations = {}  # each kind's cos and sin of the chunk's positions (rows x tokens x 1 x dim)
        for kind in self.kinds:
            rotary = self._table(int(starts.max()) + tokens, device, kind)[positions]
            rotations[kind] = rotary[:, :, None, 0], rotary[:, :, None, 1]
        half, heads, kv_heads, dim = self.head_dim // 2, self.heads, self.kv_heads, self.head_dim

        hidden = self.embed(ids.to(device)).view(rows * tokens, -1)
        size = hidden.shape[-1]
        for layer in self.layers:
            mask = masks[layer.kind] if isinstance(masks, dict) else masks
            cos, sin = rotations[layer.kind]
            qkv = layer.qkv(layer.norms[0](hidden), names).view(rows, tokens, heads + 2 * kv_heads, dim)
            qk = qkv[:, :, :heads + kv_heads]
            if layer.head_norm is not None:  # Qwen3, Gemma 3: each head of q and k normed
                qk = layer.head_norm(qk)
            qk = qk * cos + qk.roll(half, -1) * sin  # two roundings, as transformers (addcmul rounds once)
            keys, values = slots.put(layer.index, qk[:, :, heads:].reshape(-1, kv_heads, dim),
                                     qkv[:, :, heads + kv_heads:].reshape(-1, kv_heads, dim))
            attended = F.scaled_dot_product_attention(qk[:, :, :heads].transpose(1, 2), keys, values, attn_mask=mask,
                                                      scale=self.scaling, enable_gqa=heads != kv_heads)
            attended = attended.transpose(1, 2).reshape(rows * tokens, heads * dim)
            if self.gemma:  # each block's output normed, then added to the residual
                hidden = hidden + layer.norms[1](layer.o(attended, names))
                gate, up = layer.gate_up(layer.norms[2](hidden), names).split(layer.gate_up_sizes, dim=-1)
                hidden = hidden + layer.norms[3](layer.down(self.act(gate).mul_(up), names))
            else:  # the residual added on the products
                hidden = layer.o(attended, names, residual=hidden)
                gate, up = layer.gate_up(layer.norms[1](hidden), names).split(layer.gate_up_sizes, dim=-1)
                hidden = layer.down(self.act(gate).mul_(up), names, residual=hidden)

        hidden = hidden.view(rows, tokens, -1)
        hidden = hidden[:, keep] if isinstance(keep, torch.Tensor) else hidden[:, -keep:]
        return self.head(self.norm(hidden).view(-1, size), None).view(*hidden.shape[:2], -1).float()
