"""Batching for every objective: packed rows for decoders, length-grouped padded batches otherwise.

Packing: examples share fixed-length rows, so no compute is spent on padding. Examples in a row are
told apart by their position ids, which restart at 0 for each example; transformers turns that into
a block-diagonal causal mask, so packed examples never attend to each other (see
``masking_utils.find_packed_sequence_indices``).

Shared prefixes: when every example starts with the same tokens (a system prompt, the chat
template's header, an instruction), a row holds them once, followed by each example's remainder. A
4D attention mask lets each remainder see the prefix and itself only, and its position ids continue
from the prefix, so each example is computed exactly as if it were alone; the prefix's gradient is
the sum of what every example in the row sends it.

Length grouping: examples that cannot share a row (encoders attend both ways; prompt-learning
methods prepend virtual tokens once per row) go one per row, in batches of similar length, so
that padding stays small.
"""

from __future__ import annotations

import bisect
import random

import torch

from tunesmith.data.format import IGNORE


def plan_rows(lengths: list[int], row_len: int, one_per_row: bool = False) -> list[list[int]]:
    """Best-fit decreasing bin packing of example indices into rows of at most row_len tokens.

    Longest first, each example goes to the row it leaves with the least free space. Rows are kept
    by free space, so planning takes O(n log n), not the O(n * rows) of scanning every row: 100,000
    examples plan in 0.12 s on 2 CPU cores (`python benchmarks/limits.py --only size`).

    ``one_per_row`` gives each example a row of its own, longest first, for methods whose forward
    cannot tell packed examples apart (``Method.packs``), and for length-grouped batches.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if one_per_row:
        return [[i] for i in order]
    rows: list[list[int]] = []
    free: list[int] = []
    with_space: dict[int, list[int]] = {}  # free space -> rows with exactly that much
    spaces: list[int] = []  # the keys of with_space, sorted
    for i in order:
        n = min(lengths[i], row_len)
        at = bisect.bisect_left(spaces, n)
        if at < len(spaces):
            r = with_space[spaces[at]].pop()
            if not with_space[spaces[at]]:
                del with_space[spaces.pop(at)]
        else:
            r = len(rows)
            rows.append([])
            free.append(row_len)
        rows[r].append(i)
        free[r] -= n
        if free[r]:
            if free[r] not in with_space:
                bisect.insort(spaces, free[r])
                with_space[free[r]] = []
            with_space[free[r]].append(r)
    return rows


def shared_prefix(examples: list[dict]) -> int:
    """How many tokens every example starts with, stopping before the token that precedes an
    example's first trained token, so that every trained token is predicted within its remainder.

    Found from the token ids, not from the config: whatever the template and instruction render
    the same for every example. 0 for fewer than two examples.
    """
    if len(examples) < 2:
        return 0
    ids = examples[0]["input_ids"]
    limit = len(ids)
    for e in examples:
        trained = next((i for i, label in enumerate(e["labels"]) if label != IGNORE), len(e["labels"]))
        limit = min(limit, trained - 1, len(e["input_ids"]) - 1)
    n = 0
    while n < limit and all(e["input_ids"][n] == ids[n] for e in examples):
        n += 1
    return n


def plan_batches(examples: list[dict], batch_tokens: int, row_len: int, seed: int | None,
                 one_per_row: bool = False, prefix: int = 0) -> list[list[list[int]]]:
    """Batches of rows of example indices. Shuffled with ``seed`` (None keeps a fixed order).

    With a shared ``prefix`` (packed rows only), each row holds the prefix once and the examples'
    remainders after it.
    """
    lengths = [min(len(e["input_ids"]), row_len) - prefix for e in examples]
    rows = plan_rows(lengths, row_len - prefix, one_per_row)
    if one_per_row:
        return [[[i] for i in batch] for batch in length_grouped([min(n, row_len) for n in lengths],
                                                                  batch_tokens, seed)]
    if seed is not None:
        random.Random(seed).shuffle(rows)
    per_batch = max(1, batch_tokens // row_len)
    return [rows[i : i + per_batch] for i in range(0, len(rows), per_batch)]


def length_grouped(lengths: list[int], batch_tokens: int, seed: int | None) -> list[list[int]]:
    """Batches of example indices of similar length, each at most ``batch_tokens`` once padded.

    Longest first, so a batch's first example sets its padded width; the batches (not the
    examples) are shuffled with ``seed`` (None keeps the fixed order).
    """
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    if seed is not None:
        random.Random(seed).shuffle(batches)
    return batches


def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    """Right-padded [len(seqs), longest] tensor."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out


def collate(examples: list[dict], rows: list[list[int]], row_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Tensors for one batch: input_ids, position_ids, labels and seq_ids ([B, T] each).

    ``seq_ids`` holds, for every token, the index of its example in ``examples`` (-1 on padding),
    so callers can sum losses per example.
    """
    width = max(sum(min(len(examples[i]["input_ids"]), row_len) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seq = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ex = examples[i]
            n = min(len(ex["input_ids"]), row_len)
            ids[r, at : at + n] = torch.tensor(ex["input_ids"][:n])
            labels[r, at : at + n] = torch.tensor(ex["labels"][:n])
            # An example's first token has no context of its own to be predicted from: the token
            # before it belongs to another example.
            labels[r, at] = IGNORE
            pos[r, at : at + n] = torch.arange(n)
            seq[r, at : at + n] = i
            at += n
        # Padding forms its own sequence (positions restart), so it never joins the last example.
        pos[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "position_ids": pos, "labels": labels, "seq_ids": seq}


def collate_shared(examples: list[dict], rows: list[list[int]], row_len: int, pad_id: int,
                   prefix: int) -> dict[str, torch.Tensor]:
    """``collate`` for rows that hold a shared prefix once, then each example's remainder.

    Adds ``attention_mask`` [B, 1, T, T] (True: may attend): a remainder sees the prefix and itself,
    causally; padding sees only itself. ``seq_ids`` is -2 on the prefix. Every example's token at
    ``prefix`` is untrained (``shared_prefix`` stops before it), so no trained token is predicted
    from another example's remainder.
    """
    head = examples[rows[0][0]]["input_ids"][:prefix]
    width = prefix + max(sum(min(len(examples[i]["input_ids"]), row_len) - prefix for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seq = torch.full((len(rows), width), -1, dtype=torch.long)
    ids[:, :prefix] = torch.tensor(head, dtype=torch.long)
    pos[:, :prefix] = torch.arange(prefix)
    seq[:, :prefix] = -2
    for r, row in enumerate(rows):
        at = prefix
        for i in row:
            ex = examples[i]
            n = min(len(ex["input_ids"]), row_len) - prefix
            ids[r, at : at + n] = torch.tensor(ex["input_ids"][prefix : prefix + n])
            labels[r, at : at + n] = torch.tensor(ex["labels"][prefix : prefix + n])
            pos[r, at : at + n] = torch.arange(prefix, prefix + n)
            seq[r, at : at + n] = i
            at += n
        pos[r, at:] = torch.arange(width - at)
    index = torch.arange(width)
    causal = index[None, :] <= index[:, None]
    same = (seq[:, :, None] == seq[:, None, :]) & (seq[:, :, None] >= 0)
    sees_prefix = (index < prefix)[None, None, :] & (seq[:, :, None] != -1)
    mask = ((same | sees_prefix) & causal) | torch.eye(width, dtype=torch.bool)
    return {"input_ids": ids, "position_ids": pos, "labels": labels, "seq_ids": seq,
            "attention_mask": mask.unsqueeze(1)}
