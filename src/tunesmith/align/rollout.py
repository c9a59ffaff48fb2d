"""The model side of PPO and GRPO: sampling answers with the KV cache, and the per-token
log-probabilities of those answers under the policy and the reference; PPO's policy with its value
head, and the values of its states.

The reference is the policy with its adapter disabled (one copy of the weights). Answers are the
tokens after a left-padded prompt, up to and including the first end-of-turn token; everything
after it is padding, which matters when the pad token is the end-of-turn token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class PolicyWithValue(torch.nn.Module):
    """A causal LM (with its adapter) and a linear value head on its last hidden states, trained together."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.value_head = torch.nn.Linear(model.config.get_text_config().hidden_size, 1)
        # Values start at 0: a random head would add noise to the first steps' advantages.
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and values of the last ``keep`` positions."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                         output_hidden_states=True, logits_to_keep=keep)
        hidden = out.hidden_states[-1][:, -keep:].float()
        return out.logits, self.value_head(hidden).squeeze(-1)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows, numbered as ``generate`` numbers them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@dataclass
class Rollout:
    sequences: torch.Tensor  # [B, P + T] left-padded prompt, then the answer
    attention_mask: torch.Tensor  # [B, P + T]
    prompt_len: int  # P
    mask: torch.Tensor  # [B, T] 1 for answer tokens (end-of-turn token included)
    ended: torch.Tensor  # [B] the answer has its end-of-turn token
    # With ``sample(record=True)``: as the sampler saw them, for each answer token, its log-probability
    # under the sampling distribution and the last hidden state that chose it (the value head's input).
    logprobs: torch.Tensor | None = None  # [B, T]
    states: torch.Tensor | None = None  # [B, T, H]

    @property
    def answers(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len:]


def end_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | {tokenizer.eos_token_id}


def answer_mask(answers: torch.Tensor, eos: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, ended)``: tokens up to and including the first end-of-turn token, and whether there is one."""
    is_end = torch.zeros_like(answers, dtype=torch.bool)
    for token in eos:
        is_end |= answers == token
    ends_before = is_end.long().cumsum(1) - is_end.long()  # end tokens strictly before each position
    return (ends_before == 0).float(), is_end.any(1)


class RowSampler:
    """A logits processor that draws each row's next token with the row's own generator (plain
    sampling at ``temperature``) and leaves that token the only choice, so that ``generate`` run
    greedily takes it. A row's answer then depends on its seed and its logits alone, not on the rows
    sampled beside it (``generate``'s own sampling draws every row from one random stream)."""

    def __init__(self, seeds: list[int], temperature: float, device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, -1)
        chosen = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        return torch.full_like(scores, -math.inf).scatter_(1, chosen.unsqueeze(1), 0.0)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[list[int]], samples_per_prompt: int, max_new_tokens: int,
           temperature: float, top_k: int, device, record: bool = False, record_states: bool = True,
           seeds: list[int] | None = None) -> Rollout:
    """``samples_per_prompt`` answers per prompt (grouped by prompt) sampled from the causal LM
    ``model`` (the policy's, or any), with the KV cache; the answers to one prompt share its cache.

    ``record`` keeps what each decoding step computed anyway: the logits (as log-probabilities of
    the sampled tokens) and, with ``record_states``, the last hidden states. PPO takes its "old"
    log-probabilities and values from them, and GRPO its old log-probabilities, instead of running the
    policy over every answer again (a fifth of a PPO step on CPU); they equal a fresh forward pass up
    to float rounding (``tests/test_align_ppo_run.py``). GRPO has no value head and keeps no states:
    every layer's, for every answer token, is memory a large group would feel.

    ``seeds``: one per answer (grouped by prompt), each answer drawn by its own generator
    (``RowSampler``, without top-k) instead of the caller's random stream.
    """
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    eos = end_ids(model, tokenizer)
    cache = shared_prompt_cache(model, ids, attention, samples_per_prompt)
    ids, attention = ids.repeat_interleave(samples_per_prompt, 0), attention.repeat_interleave(samples_per_prompt, 0)
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=1.0) if seeds is None else \
        dict(do_sample=False, logits_processor=[RowSampler(seeds, temperature, device)])
    out = model.generate(input_ids=ids, attention_mask=attention, past_key_values=cache, **sampling,
                         max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=sorted(eos),
                         return_dict_in_generate=True, output_logits=record,
                         output_hidden_states=record and record_states)
    sequences = out.sequences
    answers = sequences[:, width:]
    mask, ended = answer_mask(answers, eos)
    rollout = Rollout(sequences, torch.cat([attention, mask.long()], 1), width, mask, ended)
    if record:
        logits = torch.stack(out.logits, 1)  # [B, T, V]: before temperature and top-k
        rollout.logprobs = torch.log_softmax(logits.float() / temperature, -1).gather(
            -1, answers.unsqueeze(-1)).squeeze(-1)
    if record and record_states:
        # Each step's hidden states, per layer; the last layer's at the step's last position chose its token.
        rollout.states = torch.stack([step[-1][:, -1] for step in out.hidden_states], 1).float()
    return rollout


def answer_texts(tokenizer, rollout: Rollout) -> list[str]:
    """Each answer as text: its tokens up to its end, special tokens left out."""
    return [tokenizer.decode(a[m.bool()], skip_special_tokens=True).strip()
            for a, m in zip(rollout.answers.cpu(), rollout.mask.cpu())]


@torch.no_grad()
def shared_prompt_cache(model, ids: torch.Tensor, attention: torch.Tensor, samples: int):
    """The KV cache of the prompts (all but their last token, which generate runs itself), computed
    once per prompt and repeated for each of its ``samples`` answers; None when there is nothing to share."""
    from transformers import DynamicCache

    if samples == 1 or ids.shape[1] < 2:
        return None
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :-1], attention_mask=attention[:, :-1], position_ids=positions(attention)[:, :-1],
          past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(samples)
    return cache


def answer_logprobs(policy: PolicyWithValue, rollout: Rollout, temperature: float,
                    rows: torch.Tensor | slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per answer token of ``rows``: the log-probability of the sampled token under the sampling
    distribution (logits / temperature), and the value of the state before it."""
    seqs, attention = rollout.sequences[rows], rollout.attention_mask[rows]
    answers = seqs[:, rollout.prompt_len:]
    logits, values = policy(seqs, attention, keep=answers.shape[1] + 1)
    return _sampled_logprobs(logits, answers, temperature), values[:, :-1]


def causal_logprobs(model, rollout: Rollout, temperature: float,
                    rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """``answer_logprobs`` under a causal LM with no value head (GRPO's policy), with their gradients."""
    seqs, attention = rollout.sequences[rows], rollout.attention_mask[rows]
    answers = seqs[:, rollout.prompt_len:]
    logits = model(input_ids=seqs, attention_mask=attention, position_ids=positions(attention),
                   logits_to_keep=answers.shape[1] + 1).logits
    return _sampled_logprobs(logits, answers, temperature)


@torch.no_grad()
def model_logprobs(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """``causal_logprobs`` without gradients (a tuned model and its base, say)."""
    return causal_logprobs(model, rollout, temperature)


def _sampled_logprobs(logits: torch.Tensor, answers: torch.Tensor, temperature: float) -> torch.Tensor:
    # The logits before each answer token: the last one (after the final token) predicts nothing.
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logp.gather(-1, answers.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def reference_model_logprobs(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """``model_logprobs`` under the reference: ``model`` (a PEFT model) with its adapter disabled."""
    with model.disable_adapter():
        return model_logprobs(model, rollout, temperature)


def reference_logprobs(policy: PolicyWithValue, rollout: Rollout, temperature: float) -> torch.Tensor:
    return reference_model_logprobs(policy.model, rollout, temperature)
