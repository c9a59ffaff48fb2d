"""LoRA deltas of a batch whose rows use different adapters, in one product per layer.

PEFT's mixed batches (``adapter_names``) gather each adapter's rows, run its two small products and
scatter the result back, in every LoRA layer: on SmolLM2-135M decoding 16 rows of two adapters, that
gathering and scattering took about a seventh of the CPU time (docs/serving.md, the profile). Here
the adapters' ``A`` matrices are stacked into one, each row's input goes through all of them at once,
a mask keeps each row's own adapter's columns (scaled), and the stacked ``B`` matrices bring them
back: two products for the whole batch, whatever the number of adapters. The ranks are small, so the
columns of the other adapters cost little.

A batch whose rows all use one adapter (a lone request, or the rows that outlive the others) goes
through that adapter's own two matrices, its scale folded into ``B`` once and the delta added in the
base product's ``addmm``: three products a layer, where PEFT's plain forward calls four modules
(``base_layer``, ``lora_A``, ``lora_B``, ``lora_dropout``) and adds a scale and a sum, for every LoRA
layer of every token (210 layers of SmolLM2-135M with LoRA on every linear layer).

Only plain LoRA linear layers are done so (no DoRA or other variant, no LoRA bias); every other
layer keeps PEFT's routing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def stackable(module) -> bool:
    """Whether ``module`` is a plain LoRA linear layer, whose rows this module can route."""
    from peft.tuners.lora import Linear

    return (isinstance(module, Linear) and not module.merged and not getattr(module, "lora_variant", None)
            and all(module.lora_A[n].bias is None and module.lora_B[n].bias is None for n in module.lora_A))


class StackedLora:
    """One LoRA linear layer's adapters stacked: ``A`` (their ranks' rows, one after another) and ``B``
    (their columns), and where each adapter's rows lie."""

    def __init__(self, module):
        names = list(module.lora_A)
        self.A = torch.cat([module.lora_A[n].weight for n in names])
        self.B = torch.cat([module.lora_B[n].weight for n in names], dim=1)
        self.blocks: dict[str, tuple[int, int, float]] = {}
        start = 0
        for n in names:
            rank = module.lora_A[n].weight.shape[0]
            self.blocks[n] = (start, start + rank, module.scaling[n])
            start += rank
        self._pairs: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Adapter ``name``'s ``A.T`` and scaled ``B.T``, each contiguous (``x @ A.T @ B.T`` is its
        delta); None for the base, or an adapter this layer lacks."""
        if name not in self._pairs:
            self._pairs[name] = None
            if name in self.blocks:
                start, end, scale = self.blocks[name]
                self._pairs[name] = (self.A[start:end].T.contiguous(), (self.B[:, start:end] * scale).T.contiguous())
        return self._pairs[name]

    def mask(self, names: list[str]) -> torch.Tensor:
        """Each row's scale on the stacked ranks: its adapter's scaling on its block, 0 elsewhere (and
        everywhere for the base, or an adapter this layer lacks)."""
        mask = torch.zeros(len(names), self.A.shape[0], dtype=self.A.dtype)
        for row, name in enumerate(names):
            if name in self.blocks:
                start, end, scale = self.blocks[name]
                mask[row, start:end] = scale
        return mask.to(self.A.device)


def route(module, names: Callable[[], list[str] | str | None]) -> Callable[[], None]:
    """Make ``module`` (``stackable``) add each row's own adapter's delta whenever ``names()`` gives the
    rows' adapters: a list, one name per row (one stacked product); one name, that of every row (its
    own matrices); ``None``: its own forward. Returns what undoes it."""
    stacked = StackedLora(module)
    masks: dict[tuple[str, ...], torch.Tensor] = {}  # the rows' adapters change only when rows join or leave
    plain = module.forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = names()
        if rows is None:
            return plain(x, *args, **kwargs)
        result = module.base_layer(x, *args, **kwargs)
        if isinstance(rows, str):
            return _add_delta(result, x, stacked.pair(rows))
        key = tuple(rows)
        if key not in masks:
            masks.clear()
            masks[key] = stacked.mask(rows)
        mask = masks[key].view(len(rows), *([1] * (x.dim() - 2)), -1)
        delta = ((x.to(stacked.A.dtype) @ stacked.A.T) * mask) @ stacked.B.T
        return result + delta.to(result.dtype)

    module.forward = forward
    return lambda: vars(module).pop("forward", None)


def _add_delta(result: torch.Tensor, x: torch.Tensor, pair: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``result`` plus one adapter's delta of ``x`` (``StackedLora.pair``; None: no delta)."""
    if pair is None:
        return result
    down, up = pair
    hidden = x.reshape(-1, x.shape[-1]).to(down.dtype) @ down
    if result.dtype != up.dtype:  # the base in bfloat16, the adapter in float32: summed as PEFT sums them
        return (result + (hidden @ up).view_as(result)).to(result.dtype)
    return torch.addmm(result.reshape(-1, result.shape[-1]), hidden, up).view_as(result)
