"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020), for any decoder architecture.

An adapter turns a sublayer's output h into h + up(act(down(h))): a projection to ``adapter_size``
features and back, with ``up`` zero-initialised so that training starts exactly from the base
model. Adapters follow the feed-forward sublayer of every transformer block (``adapter_position:
ffn``, Pfeiffer) or the attention sublayer too (``both``, Houlsby); ``target_modules`` names other
sublayers of a block instead. Only the adapters train. They cannot merge: the activation between
the projections is not linear.

Each adapter is a child named ``adapter`` of its sublayer, run by a forward hook: module paths and
attributes stay as the architecture's code expects them, and the decoder can still be run directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from pydantic import Field
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.methods.base import Method
from tunesmith.options import Section

ATTENTION = ("self_attn", "attn", "attention", "self_attention")
FEEDFORWARD = ("mlp", "feed_forward", "ffn")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}
CONFIG_FILE = "bottleneck_adapter.json"
WEIGHTS_FILE = "bottleneck_adapter.safetensors"


class Options(Section):
    name: Literal["adapter"] = "adapter"
    adapter_size: int = Field(64, ge=1, description="Bottleneck width of each adapter.")
    adapter_position: Literal["ffn", "both"] = Field(
        "ffn", description="After the feed-forward block (Pfeiffer) or after attention too (Houlsby)."
    )
    adapter_activation: Literal["gelu", "relu"] = "gelu"
    target_modules: list[str] | str | None = Field(
        None, description="Sublayers of a block to follow with an adapter, instead of adapter_position's."
    )


class BottleneckAdapter(nn.Module):
    def __init__(self, features: int, size: int, activation: str):
        super().__init__()
        self.activation = activation
        self.down = nn.Linear(features, size)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # Float32 adapter weights under a half-precision base, as PEFT does for LoRA.
        update = self.up(self.act(self.down(h.to(self.down.weight.dtype))))
        return h + update.to(h.dtype)


def _run_adapter(module: nn.Module, args, output):
    if isinstance(output, tuple):  # attention returns (hidden states, attention weights)
        return (module.adapter(output[0]), *output[1:])
    return module.adapter(output)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the first ModuleList with one entry per layer of the config."""
    layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers:
            return module
    raise TunesmithError(f"method.name: adapter found no list of the {layers} transformer blocks in model type "
                         f"{model.config.model_type!r}")


def _block_names(block: nn.Module) -> str:
    return ", ".join(n for n, _ in block.named_modules() if n)


def default_targets(block: nn.Module, position: str) -> list[str]:
    """The names of the block's feed-forward sublayer, and of its attention with ``position='both'``."""
    groups = [ATTENTION, FEEDFORWARD] if position == "both" else [FEEDFORWARD]
    targets = []
    for names in groups:
        found = next((n for n in names if isinstance(getattr(block, n, None), nn.Module)), None)
        if found is None:
            raise TunesmithError(
                f"method.target_modules: adapter found none of {', '.join(names)} in a transformer block; "
                f"name the sublayers to adapt (module names in a block: {_block_names(block)})"
            )
        targets.append(found)
    return targets


def add_adapters(model: nn.Module, targets: list[str], size: int, activation: str) -> nn.Module:
    """Freeze ``model`` and put an adapter after each ``targets`` sublayer of every block, in place."""
    blocks = decoder_blocks(model)
    hidden = model.config.get_text_config().hidden_size
    device = next(model.parameters()).device
    model.requires_grad_(False)
    for block in blocks:
        for name in targets:
            try:
                sublayer = block.get_submodule(name)
            except AttributeError:
                raise TunesmithError(f"method.target_modules: {name!r} matches no module in a transformer block; "
                                     f"module names in a block: {_block_names(block)}") from None
            features = getattr(sublayer, "out_features", hidden)
            sublayer.adapter = BottleneckAdapter(features, size, activation).to(device)
            sublayer.register_forward_hook(_run_adapter)
    return model


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{name}.{key}": p for name, module in model.named_modules() if isinstance(module, BottleneckAdapter)
            for key, p in module.named_parameters()}


def apply(model, cfg):
    targets = cfg.target_modules or default_targets(decoder_blocks(model)[0], cfg.adapter_position)
    targets = [targets] if isinstance(targets, str) else targets
    return add_adapters(model, targets, cfg.adapter_size, cfg.adapter_activation)


def save(model, path: Path) -> None:
    block = decoder_blocks(model)[0]
    adapters = {n.removesuffix(".adapter"): m for n, m in block.named_modules() if isinstance(m, BottleneckAdapter)}
    first = next(iter(adapters.values()))
    settings = {"targets": list(adapters), "adapter_size": first.down.out_features, "activation": first.activation}
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(settings, indent=1))
    save_file({n: p.detach().contiguous() for n, p in adapter_parameters(model).items()}, path / WEIGHTS_FILE)


def load(base, path: Path):
    settings = json.loads((path / CONFIG_FILE).read_text())
    model = add_adapters(base, settings["targets"], settings["adapter_size"], settings["activation"])
    weights = load_file(path / WEIGHTS_FILE)
    params = adapter_parameters(model)
    if weights.keys() != params.keys():
        raise TunesmithError(f"{path}: the saved adapter weights do not fit this base model")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return model


METHOD = Method(name="adapter", options=Options, apply=apply, save=save, load=load)
