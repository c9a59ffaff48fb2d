"""Causal LM token losses with the output projection computed only where a label is.

Shared by the objectives that score a causal LM's tokens: supervised fine-tuning and continued
pre-training today, preference objectives (which sum log-probabilities per sequence) next.

Prompt tokens need no logits: with a 49k-token vocabulary the output projection is a large share
of the compute, and the full [tokens x vocab] logits tensor is the largest activation. Logits are
computed in chunks under activation checkpointing, so at most one chunk of them exists at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunesmith.data.format import IGNORE
from tunesmith.model import unwrap

# Labelled tokens per logits chunk. `python benchmarks/ce_chunk.py` (2 CPU cores, every token
# labelled): 7.4 s a step and 6.8 GB peak at 512, against 10.8 s and 7.6 GB at 2048.
CHUNK = 512


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="none")


def token_losses(model, batch: dict[str, torch.Tensor], direct: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses at labelled positions, and the flat indices (into [B, T-1]) they belong to.

    ``direct`` runs the decoder and the output head separately (the fast path); otherwise the
    model's own forward computes logits for every position (for methods that need their forward).
    """
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    targets = labels[mask]
    where = mask.flatten().nonzero().squeeze(1)
    if not direct:
        return _forward_losses(model, batch, mask, targets), where
    inner = unwrap(model)
    decoder = getattr(inner, inner.base_model_prefix)
    head = inner.get_output_embeddings()
    # No cache: with one, transformers would not read the packing from the position ids. Rows of
    # one example need no position ids: without them attention is plainly causal, with no mask.
    # Rows with a shared prefix bring their own 4D mask (data/batching.py).
    if "attention_mask" in batch:
        extra = {"position_ids": batch["position_ids"], "attention_mask": batch["attention_mask"]}
    else:
        extra = {"position_ids": batch["position_ids"]} if is_packed(batch) else {}
    hidden = decoder(input_ids=batch["input_ids"], use_cache=False, **extra).last_hidden_state
    hidden = hidden[:, :-1][mask]
    losses = [
        checkpoint(_chunk_loss, h, head.weight, head.bias, t, use_reentrant=False)
        if torch.is_grad_enabled() else _chunk_loss(h, head.weight, head.bias, t)
        for h, t in zip(hidden.split(CHUNK), targets.split(CHUNK))
    ]
    return torch.cat(losses) if losses else hidden.new_zeros(0), where


def is_packed(batch: dict[str, torch.Tensor]) -> bool:
    """Whether some row holds more than one example: an example starts after the row's first token.

    (Rows with a shared prefix carry their own attention mask, and are not asked.)"""
    starts = (batch["position_ids"][:, 1:] == 0) & (batch["seq_ids"][:, 1:] >= 0)
    return bool(starts.any())


def _forward_losses(model, batch, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Position ids, with no cache, tell packed examples apart. Rows of one example need neither,
    # and prompt-learning methods must place their virtual tokens themselves: PEFT drops or shifts
    # the position ids, and hands prefix tuning's keys and values to the model as a cache.
    extra = {}
    if is_packed(batch):
        if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
            raise ValueError("prompt-learning methods prepend virtual tokens once per row: batches must hold "
                             "one example per row (Method.packs is False)")
        extra = {"position_ids": batch["position_ids"], "use_cache": False}
    logits = model(input_ids=batch["input_ids"], **extra).logits
    # Prompt tuning and p-tuning put their virtual tokens before the row; drop the logits there.
    logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1] :]
    return F.cross_entropy(logits[:, :-1][mask].float(), targets, reduction="none")


def loss_sum(model, batch, direct: bool = True) -> tuple[torch.Tensor, int]:
    """Sum of token losses and the number of trained tokens in the batch."""
    losses, _ = token_losses(model, batch, direct)
    return losses.sum(), losses.numel()


def example_losses(model, batch, direct: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed loss and trained-token count of each example in a batch, with gradients kept.

    Returns ``(examples, sums, counts)``: the example indices present in the batch (its ``seq_ids``,
    ascending), and for each the sum of its token losses (a tensor in the autograd graph, so a
    step can clip per example, as differentially private training does) and its token count.
    """
    losses, where = token_losses(model, batch, direct)
    seq = batch["seq_ids"][:, 1:].flatten()[where]
    examples, slot = torch.unique(seq, return_inverse=True)
    sums = losses.new_zeros(len(examples), dtype=torch.float32).index_add(0, slot, losses.float())
    counts = torch.zeros(len(examples), dtype=torch.long, device=seq.device).index_add_(0, slot, torch.ones_like(slot))
    return examples, sums, counts


def row_loss(model, batch, direct: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token loss and trained-token count of a batch of one row holding one example.

    Written with no shape that depends on the data (no selection of labelled positions, no
    checkpointed chunks), so that ``torch.func.vmap`` can batch it over the rows of a micro-batch:
    private training's per-example gradients. The price is logits at every position. Right padding
    needs no mask: a causal model's real tokens never attend to the padding after them.
    """
    labels = batch["labels"][:, 1:]
    if direct:
        inner = unwrap(model)
        decoder = getattr(inner, inner.base_model_prefix)
        hidden = decoder(input_ids=batch["input_ids"], use_cache=False).last_hidden_state
        logits = inner.get_output_embeddings()(hidden[:, :-1])
    else:
        logits = model(input_ids=batch["input_ids"]).logits
        # Prompt tuning and p-tuning put their virtual tokens before the row; drop the logits there.
        logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1] :][:, :-1]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()
