"""Structured output: ``response_format`` ``json_object`` and ``json_schema``, by constrained decoding.

llguidance (a Rust library with Python bindings and no torch of its own) compiles the JSON schema
into a grammar and, at each step, computes from the tokenizer's own token texts which tokens may
come next. A request's grammar is compiled and checked at the edge, so a schema it cannot enforce is
the client's 400; in the engine each row that asks for one gets its own ``Constraint``. Before the
row samples (greedy or not) every token the grammar does not allow loses all its probability, and
end of sequence is allowed only once the JSON is complete; the row ends there, or as soon as the
grammar allows nothing more. Only a token limit can cut the JSON short: that answer ends with
finish_reason ``length``, as OpenAI's does, and may not parse.

The JSON is written compactly, with ``json.dumps``'s separators (``", "`` and ``": "``) and no other
whitespace: a model free to add whitespace between tokens can keep adding it until the token limit,
a known way for JSON modes to fail.
"""

from __future__ import annotations

import functools
import json

import torch
from llguidance import LLMatcher, LLParserLimits, LLTokenizer

# Applied over the schema's own "x-guidance" options, which a client could otherwise use to turn
# whitespace back on.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_ERROR_CHARS = 500  # llguidance's messages can quote much of a large schema
MAX_NESTING = 64  # levels of a schema's JSON; llguidance's own parser stops at 128


def _limits() -> LLParserLimits:
    # llguidance's defaults bound a grammar's size and each step's work; its verbose errors would
    # echo the parser's state into the client's 400.
    return LLParserLimits(verbose_errors=False)


def schema_of(response_format) -> dict | None:
    """The JSON schema a ``schemas.ResponseFormat`` asks for; None for free text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    schema = response_format.json_schema.schema_
    return {} if schema is None else schema  # OpenAI's schema is optional: any JSON value


def grammar_for(response_format, tokenizer, eos: set[int]) -> str | None:
    """The llguidance grammar of a request's ``response_format`` (None: free text), checked against the
    served tokenizer. Raises ``ValueError`` saying what is wrong: a schema it cannot enforce (a keyword
    it does not implement, a broken ``$ref`` or pattern, nesting beyond its limit, a ``$ref`` to itself
    that no answer can start), or a tokenizer it cannot read."""
    schema = schema_of(response_format)
    if schema is None:
        return None
    if nesting(schema) > MAX_NESTING:
        raise ValueError(f"the schema is nested over {MAX_NESTING} levels deep")
    # As text: llguidance parses text with a depth limit, but converts a Python dict recursively, and a
    # dict thousands of levels deep overflows its stack (the whole server would crash).
    grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer(tokenizer, eos),
                                                                limits=_limits())
    if failed:
        raise ValueError(f"the schema cannot be enforced: {messages[0][:MAX_ERROR_CHARS]}")
    try:  # the first step, as a row would take it: a grammar that allows no first token fails here
        Constraint(grammar, tokenizer, eos).allowed(len(tokenizer))
    except RuntimeError as err:
        raise ValueError(f"the schema cannot be enforced: {err}") from None
    return grammar


def nesting(value) -> int:
    """How deep JSON ``value`` nests (a scalar: 0), counted without recursion, up to ``MAX_NESTING`` + 1."""
    deepest, level = 0, [(value, 0)]
    while level:
        item, depth = level.pop()
        if isinstance(item, dict | list) and deepest <= MAX_NESTING:
            deepest = max(deepest, depth + 1)
            level.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


@functools.lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer, eos: frozenset[int]) -> LLTokenizer:
    from llguidance.hf import from_tokenizer

    return from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=sorted(eos))


def ll_tokenizer(tokenizer, eos: set[int]) -> LLTokenizer:
    """llguidance's view of a Hugging Face tokenizer, built once (about 0.7 s for SmolLM2's 49,152
    tokens), with ``eos`` as its end-of-sequence tokens."""
    try:
        return _ll_tokenizer(tokenizer, frozenset(eos))
    except ValueError as err:  # a slow (Python) tokenizer: llguidance reads fast ones only
        raise ValueError(f"this model's tokenizer cannot be constrained ({err})") from err


class Constraint:
    """One row's grammar: which tokens may come next, and the tokens the row has taken."""

    def __init__(self, grammar: str, tokenizer, eos: set[int]):
        self.matcher = LLMatcher(ll_tokenizer(tokenizer, eos), grammar, log_level=0, limits=_limits())
        self._check()

    def allowed(self, vocab: int) -> torch.Tensor:
        """Which of ``vocab`` token ids may come next (the model's head may be wider than the tokenizer)."""
        bias = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8) > 0
        self._check()
        keep = torch.zeros(vocab, dtype=torch.bool)
        width = min(vocab, len(bias))
        keep[:width] = bias[:width]
        if not keep.any():
            raise RuntimeError("the grammar allows no token here")
        return keep

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (one row) with every token the grammar does not allow next at -inf."""
        return logits.masked_fill(~self.allowed(logits.shape[-1]), float("-inf"))

    def take(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            self._check()
            raise RuntimeError(f"token {token} does not fit the grammar")

    @property
    def complete(self) -> bool:
        """The grammar allows nothing more (but the end of sequence): the row is done."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    def _check(self) -> None:
        if self.matcher.is_error():
            error = " ".join(self.matcher.get_error().replace("<non-verbose/>", "").split())
            raise RuntimeError(f"the grammar failed: {error[:MAX_ERROR_CHARS]}")
