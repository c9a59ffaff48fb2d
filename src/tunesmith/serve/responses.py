"""The bodies of completion answers in the OpenAI shapes: the choices of a whole answer, the choices
of a streamed chunk, and log-probabilities as the chat route gives them
(``{"content": [{token, logprob, bytes, top_logprobs}]}``) and as the completions route does
(``{tokens, token_logprobs, top_logprobs, text_offset}``).

A token's ``logprob`` is its log-probability under the model, the log-softmax of its logits before
temperature and top_p (as vLLM's default), so the label tokens of a classifier-like adapter give
its probabilities whatever the request's sampling. ``bytes`` is the UTF-8 of the token's text.
"""

from __future__ import annotations

import json

from tunesmith.serve.engine import Event, Sampling, TokenLogprob


class Choices:
    """The ``n`` choices of one request, gathered from the engine's events until each is done."""

    def __init__(self, n: int):
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.finish_reasons: list[str | None] = [None] * n
        self.completion_tokens = [0] * n

    def add(self, event: Event) -> None:
        i = event.index
        self.texts[i].append(event.text)
        self.logprobs[i].extend(event.logprobs)
        if event.kind == "done":
            self.finish_reasons[i] = event.finish_reason
            self.completion_tokens[i] = event.completion_tokens

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.finish_reasons)

    @property
    def cancelled(self) -> bool:
        return "cancelled" in self.finish_reasons

    def answer(self, index: int) -> str:
        return "".join(self.texts[index])


class Answer:
    """One request's answer in the OpenAI shapes: whole, or as the chunks of a stream."""

    def __init__(self, route: str, completion_id: str, created: int, model: str, sampling: Sampling,
                 prompt_tokens: int, tokenizer):
        self.route, self.id, self.created, self.model = route, completion_id, created, model
        self.sampling, self.prompt_tokens, self.tokenizer = sampling, prompt_tokens, tokenizer

    def logprobs(self, tokens) -> dict | None:
        return None if self.sampling.logprobs is None else logprobs_body(self.route, self.tokenizer, tokens)

    def usage(self, choices: Choices) -> dict:
        """The prompt counted once (its choices share it), the tokens of every choice."""
        completion = sum(choices.completion_tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def whole(self, choices: Choices) -> dict:
        kind = "chat.completion" if self.route == "chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": [whole_choice(self.route, i, choices.answer(i), choices.finish_reasons[i],
                                         self.logprobs(choices.logprobs[i])) for i in range(self.sampling.n)],
                "usage": self.usage(choices)}

    def chunk(self, choices: list[dict], **extra) -> str:
        kind = "chat.completion.chunk" if self.route == "chat" else "text_completion"
        payload = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                   "choices": choices, **extra}
        return f"data: {json.dumps(payload)}\n\n"


def logprobs_body(route: str, tokenizer, tokens: list[TokenLogprob]) -> dict:
    """``tokens`` in the ``route``'s shape ("chat" or "completions")."""
    if route == "chat":
        return {"content": [_chat_token(tokenizer, t) for t in tokens], "refusal": None}
    return {"tokens": [_text(tokenizer, t.token) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [_top_dict(tokenizer, t) for t in tokens],
            "text_offset": [t.offset for t in tokens]}


def whole_choice(route: str, index: int, text: str, finish_reason: str, logprobs: dict | None) -> dict:
    if route == "chat":
        return {"index": index, "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason, "logprobs": logprobs}
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


def chunk_choice(route: str, index: int, text: str | None, finish_reason: str | None = None,
                 logprobs: dict | None = None, role: bool = False) -> dict:
    """One choice of a streamed chunk: a piece of text, a finish reason, or (chat) the opening role."""
    if route == "chat":
        delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
    return {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}


def _text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def _top_dict(tokenizer, t: TokenLogprob) -> dict[str, float]:
    """As vLLM: the k most likely tokens and the chosen one, by text; tokens of one text (the byte
    tokens that decode alone to "\ufffd") keep the most likely's value."""
    top: dict[str, float] = {}
    for token, logprob in [*t.top, (t.token, t.logprob)]:
        top.setdefault(_text(tokenizer, token), logprob)
    return top


def _chat_token(tokenizer, t: TokenLogprob) -> dict:
    text = _text(tokenizer, t.token)
    return {"token": text, "logprob": t.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": (other := _text(tokenizer, i)), "logprob": lp, "bytes": list(other.encode())}
                             for i, lp in t.top]}
