"""Embeddings from the tuned model itself: last hidden states, mean-pooled over the real tokens.

What drifts is what the model reads, so the model's own representation is the one to compare; it
needs no second model. Texts are read raw (no prompt template), right-padded, in small batches.
"""

from __future__ import annotations

import torch

from tunesmith.model import unwrap


def last_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, length, hidden) of the model's last layer; the encoder's for encoder-decoders.

    Adapter layers (LoRA and the like) stay injected in the unwrapped model, so they count.
    """
    inner = unwrap(model)
    if getattr(inner.config, "is_encoder_decoder", False):
        return inner.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    out = inner(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return out.hidden_states[-1]


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 16) -> torch.Tensor:
    """One float64 vector per text: the mean of its last hidden states over non-padding tokens."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] or [tokenizer.pad_token_id]
               for t in texts[start:start + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        hidden = last_hidden(model, input_ids.to(device), mask.to(device)).double()
        weights = mask.to(device).unsqueeze(-1).double()
        out.append(((hidden * weights).sum(1) / weights.sum(1)).cpu())
    return torch.cat(out)
