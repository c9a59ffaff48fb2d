"""Score several answers to one prompt while running the prompt once.

Label accuracy needs the log-likelihood of every label string after every prompt. The prompt is
most of the tokens, so instead of one sequence per (prompt, label) each example becomes one
group laid out as ``[prompt][answer 1][answer 2]...``: every answer sees the prompt and itself,
never another answer (a custom 4D attention mask), and its position ids continue from the
prompt, so the model computes exactly what it would for ``prompt + answer``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.format import IGNORE
from tunesmith.model import unwrap
from tunesmith.data.batching import plan_rows


def shared_prefix(candidates: list[dict]) -> int:
    """Tokens common to all candidates before the first trained token of any of them."""
    first = min(next(i for i, label in enumerate(c["labels"]) if label != IGNORE) for c in candidates)
    ids = [c["input_ids"] for c in candidates]
    n = 0
    while n < first and all(len(x) > n and x[n] == ids[0][n] for x in ids):
        n += 1
    return n


def build_group(candidates: list[dict]) -> dict:
    """One example's layout: token ids, positions, branch (0 = prompt, k = answer k) and targets."""
    p = shared_prefix(candidates)
    ids = list(candidates[0]["input_ids"][:p])
    pos = list(range(p))
    branch = [0] * p
    # For every trained token: (index of the hidden state that predicts it, target id, candidate).
    targets = []
    for k, c in enumerate(candidates, start=1):
        start = len(ids)
        suffix = c["input_ids"][p:]
        ids += suffix
        pos += range(p, p + len(suffix))
        branch += [k] * len(suffix)
        for j in range(p, len(c["input_ids"])):
            if c["labels"][j] != IGNORE:
                before = j - 1
                # The token before answer k's first token is the prompt's last one.
                where = before if before < p else start + (before - p)
                targets.append((where, c["labels"][j], k - 1))
    return {"input_ids": ids, "position_ids": pos, "branch": branch, "targets": targets}


def _attention(groups: list[dict], row: list[int], width: int) -> tuple[torch.Tensor, ...]:
    ids = torch.zeros(width, dtype=torch.long)
    pos = torch.zeros(width, dtype=torch.long)
    group = torch.full((width,), -1, dtype=torch.long)
    branch = torch.zeros(width, dtype=torch.long)
    at = 0
    offsets = {}
    for g in row:
        n = len(groups[g]["input_ids"])
        ids[at : at + n] = torch.tensor(groups[g]["input_ids"])
        pos[at : at + n] = torch.tensor(groups[g]["position_ids"])
        group[at : at + n] = g
        branch[at : at + n] = torch.tensor(groups[g]["branch"])
        offsets[g] = at
        at += n
    index = torch.arange(width)
    same_group = group[:, None] == group[None, :]
    causal = (pos[None, :] <= pos[:, None]) & (index[None, :] <= index[:, None])
    visible_branch = (branch[None, :] == 0) | (branch[None, :] == branch[:, None])
    mask = (same_group & causal & visible_branch & (group[:, None] >= 0)) | torch.eye(width, dtype=torch.bool)
    return ids, pos, mask, offsets


@torch.no_grad()
def score_choices(model, encoded_choices: list[list[dict]], batch_tokens: int, row_len: int) -> torch.Tensor:
    """Summed loss of every answer: ``encoded_choices[i][k]`` is example i with answer k; [examples, answers]."""
    inner = unwrap(model)
    decoder = getattr(inner, inner.base_model_prefix)
    head = inner.get_output_embeddings()
    groups = [build_group(c) for c in encoded_choices]
    n_answers = len(encoded_choices[0])
    scores = torch.zeros(len(groups), n_answers)
    width_cap = max(row_len, max(len(g["input_ids"]) for g in groups))
    rows = plan_rows([len(g["input_ids"]) for g in groups], width_cap)
    per_batch = max(1, batch_tokens // width_cap)
    for b in range(0, len(rows), per_batch):
        batch_rows = rows[b : b + per_batch]
        width = max(sum(len(groups[g]["input_ids"]) for g in row) for row in batch_rows)
        built = [_attention(groups, row, width) for row in batch_rows]
        ids = torch.stack([x[0] for x in built]).to(head.weight.device)
        pos = torch.stack([x[1] for x in built]).to(ids.device)
        mask = torch.stack([x[2] for x in built]).unsqueeze(1).to(ids.device)
        hidden = decoder(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).last_hidden_state
        for r, row in enumerate(batch_rows):
            offsets = built[r][3]
            for g in row:
                where = torch.tensor([offsets[g] + t[0] for t in groups[g]["targets"]], device=ids.device)
                target = torch.tensor([t[1] for t in groups[g]["targets"]], device=ids.device)
                answer = torch.tensor([t[2] for t in groups[g]["targets"]])
                logits = head(hidden[r, where]).float()
                losses = F.cross_entropy(logits, target, reduction="none").cpu()
                scores[g].index_add_(0, answer, losses)
    return scores
