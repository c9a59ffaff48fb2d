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
    """The adapters of one LoRA linear layer, or of several that read the same input (the parts of a
    fused projection, as q, k and v in ``serve/decoder.py``), stacked: ``A`` (every layer's adapters'
    ranks, one after another) and ``B`` (each rank's column under its own layer's outputs, zeros under
    the others'), and where each adapter's ranks lie. A layer of the group without LoRA adds nothing."""

    def __init__(self, *modules):
        self.blocks: dict[str, list[tuple[int, int, float]]] = {}  # adapter: (first rank, end, scale) per layer
        parts, ranks, outputs = [], 0, 0
        for module in modules:
            for name in getattr(module, "lora_A", {}):
                down, up = module.lora_A[name].weight, module.lora_B[name].weight
                parts.append((down, up, outputs, ranks))
                self.blocks.setdefault(name, []).append((ranks, ranks + down.shape[0], module.scaling[name]))
                ranks += down.shape[0]
            outputs += module.out_features
        self.A = torch.cat([down for down, *_ in parts])
        self.B = self.A.new_zeros(outputs, ranks)
        for down, up, row, column in parts:
            self.B[row:row + up.shape[0], column:column + up.shape[1]] = up
        # The products take them transposed, stored so: a GEMM on a transposed operand of a few rows
        # runs several times slower on CPU (model.lay_out_for_decoding says more).
        self.At, self.Bt = self.A.T.contiguous(), self.B.T.contiguous()
        self._pairs: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._masks: dict[tuple[str, ...], torch.Tensor] = {}

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Adapter ``name``'s ``A.T`` and scaled ``B.T``, each contiguous (``x @ A.T @ B.T`` is its
        delta); None for the base, or an adapter these layers lack."""
        if name not in self._pairs:
            blocks = self.blocks.get(name)
            self._pairs[name] = None if blocks is None else (
                torch.cat([self.A[start:end] for start, end, _ in blocks]).T.contiguous(),
                torch.cat([self.B[:, start:end] * scale for start, end, scale in blocks], dim=1).T.contiguous())
        return self._pairs[name]

    def mask(self, names: list[str]) -> torch.Tensor:
        """Each row's scale on the stacked ranks: its adapter's scaling on its blocks, 0 elsewhere (and
        everywhere for the base, or an adapter these layers lack). The rows' adapters change only when
        rows join or leave, so the last batch's mask is kept."""
        key = tuple(names)
        if key not in self._masks:
            mask = torch.zeros(len(names), self.A.shape[0], dtype=self.A.dtype)
            for row, name in enumerate(names):
                for start, end, scale in self.blocks.get(name, ()):
                    mask[row, start:end] = scale
            self._masks = {key: mask.to(self.A.device)}
        return self._masks[key]

    def add(self, result: torch.Tensor, x: torch.Tensor, names: list[str] | str) -> torch.Tensor:
        """``result`` (the base product of ``x``, a tensor of its own: the delta goes in in place) plus
        each row's adapter's delta: ``names`` is one name per row (one stacked product, each row's
        positions under its row's mask), or the one adapter of every row (its own matrices)."""
        if isinstance(names, str):
            pair = self.pair(names)
            if pair is None:
                return result
            down, up = pair
        else:
            down, up = self.At, self.Bt
        x = x.reshape(-1, x.shape[-1])
        hidden = (x if x.dtype == down.dtype else x.to(down.dtype)) @ down
        if not isinstance(names, str):
            hidden.view(len(names), -1, hidden.shape[-1]).mul_(self.mask(names)[:, None])
        out = result.view(-1, result.shape[-1])
        if not isinstance(names, str):  # the delta, rounded to the base's dtype, then added: as PEFT's mixed batches
            out.add_((hidden @ up).to(out.dtype))
        elif out.dtype == up.dtype:
            out.addmm_(hidden, up)
        else:  # a bfloat16 base, a float32 adapter: summed in float32 and rounded once, as PEFT's forward
            out.add_(hidden @ up)
        return result


def route(module, names: Callable[[], list[str] | str | None]) -> Callable[[], None]:
    """Make ``module`` (``stackable``) add each row's own adapter's delta whenever ``names()`` gives the
    rows' adapters: a list, one name per row (one stacked product); one name, that of every row (its
    own matrices); ``None``: its own forward. Returns what undoes it."""
    stacked = StackedLora(module)
    plain = module.forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = names()
        if rows is None:
            return plain(x, *args, **kwargs)
        return stacked.add(module.base_layer(x, *args, **kwargs), x, rows)

    module.forward = forward
    return lambda: vars(module).pop("forward", None)

