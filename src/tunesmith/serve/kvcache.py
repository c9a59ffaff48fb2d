"""The KV caches the server owns: ``SlotCache`` (each decoding row's keys and values, in a slot of tensors
allocated once and reused by request after request) and ``PrefixCache`` (the keys and values of prompt
heads that requests share, computed once per adapter).

Why not a transformers cache. ``DynamicCache`` grows by concatenation at every step, and rows joining a
running batch mean padding and concatenating every layer again. ``StaticCache`` preallocates, but writes
every row of its batch at one shared position (its ``cumulative_length``, a single number): rows that
joined at different steps, with prompts of different lengths, cannot each write at their own position,
and a row that finishes cannot hand its room to the next request. ``SlotCache`` is a static cache with a
slot per row and a length per row: a forward pass writes each row's new keys at that row's own
positions, and attention reads the first ``width`` columns of the rows' slots (a view, not a copy),
under a mask that hides what lies past each row's length. Rows that leave free their slot for the next.

``PrefixCache`` keeps prompt heads in blocks of ``block`` tokens, each keyed by the adapter and every
token up to the block's end (so a block is only reused after the very same head, as vLLM's automatic
prefix caching does), least recently used first out once its bytes pass ``budget_bytes``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

COLUMNS = 256  # slots grow in steps of this many positions, so growing is rare


class SlotCache:
    """Keys and values of ``slots`` rows of at most ``length`` positions each, per layer, allocated at the
    first forward pass (its keys give the heads, head size, dtype and device) and grown by ``reserve``.

    Each tensor is ``slots x positions x heads x head size``: a row's new position is one contiguous
    block, so a pass writes every row's with one ``index_copy_`` (about three times faster than an
    indexed write into heads-major tensors), and attention reads a transposed view. The view costs no
    copy beyond the one transformers makes anyway: with a mask, its sdpa path repeats grouped keys
    and values (``repeat_kv``) into new tensors.

    Before each forward pass, ``bind(first, starts, tokens)`` says which rows it runs (the slots
    ``first`` to ``first + len(starts)``, contiguous, so attention reads a view) and where each row's
    ``tokens`` new positions begin; the model's attention layers then call ``update``.
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.slots, self.length = 0, 0  # the room asked for; the tensors exist after the first pass
        self._index = None
        self._first = self._rows = self._width = 0

    def reserve(self, slots: int, length: int) -> None:
        """Room for at least ``slots`` rows of ``length`` positions; what the slots hold is kept."""
        length = -(-length // COLUMNS) * COLUMNS
        if slots <= self.slots and length <= self.length:
            return
        slots, length = max(slots, self.slots), max(length, self.length)
        for tensors in (self.keys, self.values):
            for i, old in enumerate(tensors):
                new = old.new_zeros(slots, length, *old.shape[2:])
                new[:old.shape[0], :old.shape[1]] = old
                tensors[i] = new
        self.slots, self.length = slots, length

    def bind(self, first: int, starts: torch.Tensor, tokens: int) -> int:
        """The next pass runs slots ``first``.. (one per entry of ``starts``), each writing ``tokens``
        positions from its own start. Returns the width attention reads (the mask's last dimension)."""
        rows = len(starts)
        self._first, self._rows = first, rows
        # A row whose prompt ended before its batch's chunk writes padding past its length; clamped to
        # the last column, which no row reads before writing it itself.
        columns = (starts[:, None] + torch.arange(tokens)).clamp(max=self.length - 1)
        self._index = (torch.arange(first, first + rows)[:, None] * self.length + columns).reshape(-1)
        self._width = min(int(starts.max()) + tokens, self.length)
        return self._width

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write one layer's new keys and values (transformers' ``rows x heads x tokens x size``) at the
        bound rows' positions; return those rows' keys and values up to the bound width (views of the
        slots)."""
        def positions_major(states: torch.Tensor) -> torch.Tensor:
            return states.transpose(1, 2).reshape(-1, states.shape[1], states.shape[3])

        return self.put(layer_idx, positions_major(key_states), positions_major(value_states))

    def put(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys and values, positions-major (``rows * tokens x heads x size``, as
        ``serve/decoder.py`` has them), at the bound rows' positions; return those rows' keys and values
        up to the bound width, heads-major views of the slots."""
        if layer_idx == len(self.keys):
            self._allocate(keys.shape[1], keys.shape[2], values.shape[2], keys)
        key_cache, value_cache = self.keys[layer_idx], self.values[layer_idx]
        if self._index.device != key_cache.device:
            self._index = self._index.to(key_cache.device)
        key_cache.view(-1, *key_cache.shape[2:]).index_copy_(0, self._index, keys)
        value_cache.view(-1, *value_cache.shape[2:]).index_copy_(0, self._index, values)
        end = self._first + self._rows
        return (key_cache[self._first:end, :self._width].transpose(1, 2),
                value_cache[self._first:end, :self._width].transpose(1, 2))

    def _allocate(self, heads: int, key_dim: int, value_dim: int, like: torch.Tensor) -> None:
        """The next layer's tensors, of ``like``'s dtype and device."""
        self.keys.append(like.new_zeros(self.slots, self.length, heads, key_dim))
        self.values.append(like.new_zeros(self.slots, self.length, heads, value_dim))

    def move(self, source: list[int], target: list[int]) -> None:
        """Copy slots ``source`` into slots ``target`` (they may overlap: the sources are read first)."""
        if not source or not self.keys:
            return
        source_index, target_index = torch.tensor(source), torch.tensor(target)
        for tensor in self.keys + self.values:
            tensor.index_copy_(0, target_index.to(tensor.device), tensor[source_index.to(tensor.device)])

    def read(self, slot: int, start: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of one slot's keys and values at positions ``start``..``end``, per layer."""
        return [(k[slot, start:end].clone(), v[slot, start:end].clone()) for k, v in zip(self.keys, self.values)]

    def write(self, slot: int, start: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put ``layers`` (as ``read`` gives them) in one slot from position ``start``."""
        while len(self.keys) < len(layers):  # before any pass of this cache (another lane's blocks)
            keys, values = layers[len(self.keys)]
            self._allocate(keys.shape[1], keys.shape[2], values.shape[2], keys)
        for k, v, (keys, values) in zip(self.keys, self.values, layers):
            k[slot, start:start + len(keys)] = keys
            v[slot, start:start + len(values)] = values

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def attention_masks(config, starts: torch.Tensor, tokens: int, width: int, dtype: torch.dtype):
    """The additive attention mask of a pass over slots (``SlotCache.bind``): query ``t`` of row ``b``
    sits at position ``starts[b] + t`` and sees the positions up to its own (within the sliding window,
    for layers that have one). A dict by layer type for models whose layers differ (Gemma, Qwen2 with
    windows), as their forward takes it; one mask otherwise."""
    queries = (starts[:, None] + torch.arange(tokens))[:, None, :, None]
    keys = torch.arange(width)
    seen = keys <= queries

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)

    kinds = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    if len(kinds) > 1:
        return {"full_attention": additive(seen), "sliding_attention": additive(seen & (keys > queries - window))}
    if window and kinds != {"full_attention"}:
        return additive(seen & (keys > queries - window))
    return additive(seen)


@dataclass
class PrefixStats:
    hits: int = 0  # prompts that reused at least one block
    misses: int = 0  # prompts that reused none
    tokens_reused: int = 0  # prompt tokens not computed again
    evictions: int = 0  # blocks dropped for room


class PrefixCache:
    """Prompt heads' keys and values, in blocks of ``block`` tokens keyed by (adapter, every token up to
    the block's end), at most ``budget_bytes`` of them, least recently used out first."""

    def __init__(self, budget_bytes: int, block: int = 16):
        self.budget_bytes, self.block = budget_bytes, block
        self.blocks: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.nbytes = 0
        self.stats = PrefixStats()

    def lookup(self, adapter: Hashable, ids: list[int]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The stored blocks that begin ``ids``, in order, leaving at least its last token to compute (its
        logits start the answer)."""
        found = []
        for end in range(self.block, len(ids), self.block):
            layers = self.blocks.get((adapter, tuple(ids[:end])))
            if layers is None:
                break
            self.blocks.move_to_end((adapter, tuple(ids[:end])))
            found.append(layers)
        if found:
            self.stats.hits += 1
            self.stats.tokens_reused += len(found) * self.block
        else:
            self.stats.misses += 1
        return found

    def wanted(self, adapter: Hashable, ids: list[int]) -> list[int]:
        """The ends of the blocks of ``ids`` not stored yet (the same bound as ``lookup``)."""
        if not self.budget_bytes:
            return []
        return [end for end in range(self.block, len(ids), self.block) if (adapter, tuple(ids[:end])) not in self.blocks]

    def store(self, adapter: Hashable, ids: list[int], end: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the block of ``ids`` ending at ``end``; the least recently used go while over budget."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if size > self.budget_bytes:
            return
        self.blocks[adapter, tuple(ids[:end])] = layers
        self.nbytes += size
        while self.nbytes > self.budget_bytes:
            _, dropped = self.blocks.popitem(last=False)
            self.nbytes -= sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in dropped)
            self.stats.evictions += 1
