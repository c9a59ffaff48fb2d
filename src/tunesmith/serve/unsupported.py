"""The request fields this server does not implement, in one table.

A field that would change the answer and is not implemented is refused with 400 naming it, never
ignored: a client asking for tools or a logit bias must not get free text it cannot tell
from what it asked for. A refused field is still accepted at the values that ask for nothing
(``"tools": []``, ``"presence_penalty": 0``), which some clients send on every request. Fields
that change nothing the server does (``user``, ``metadata``) are accepted and ignored. Any other
field, an OpenAI field newer than this table or another server's extension (vLLM's ``top_k``,
``min_p``, ``guided_json``), is refused unless it is null.

Implementing a field means declaring it in ``serve/schemas.py`` and deleting its row here; the
table is also what docs/security.md lists ("OpenAI fields").
"""

from __future__ import annotations

from typing import Any

TOOLS = "tool and function calling are not implemented"

# field: (the values that ask for nothing, why anything else is refused)
REFUSED: dict[str, tuple[tuple, str]] = {
    "tools": ((None, []), TOOLS),
    "tool_choice": ((None, "none", "auto"), TOOLS),
    "functions": ((None, []), TOOLS),
    "function_call": ((None, "none", "auto"), TOOLS),
    "logit_bias": ((None, {}), "not implemented"),
    "presence_penalty": ((None, 0), "not implemented"),
    "frequency_penalty": ((None, 0), "not implemented"),
    "best_of": ((None, 1), "not implemented (n is)"),
    "echo": ((None, False), "not implemented"),
    "suffix": ((None, ""), "insertion is not implemented"),
    "audio": ((None,), "this server answers in text only"),
    "modalities": ((None, ["text"]), "this server answers in text only"),
    "reasoning_effort": ((None,), "the served models do not reason in a separate channel"),
    "verbosity": ((None,), "not implemented"),
    "web_search_options": ((None,), "not implemented"),
    "moderation": ((None,), "moderation (which may block an answer) is not implemented"),
}

# Fields that change no answer: bookkeeping for OpenAI's platform, or hints this server has no use for.
IGNORED = frozenset({
    "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
    "prompt_cache_retention", "prompt_cache_options", "prediction",  # a latency hint: the answer is the same without it
    "parallel_tool_calls",  # only means anything with tools, which are refused
})


def refused(extra: dict[str, Any] | None) -> tuple[str, str] | None:
    """The first field of ``extra`` (a request's undeclared fields) that must be refused, and why."""
    for name, value in (extra or {}).items():
        if name in IGNORED:
            continue
        nothing, why = REFUSED.get(name, ((None,), "not a field this server knows"))
        if not _asks_nothing(value, nothing):
            return name, f"{name}: {why}"
    return None


def _asks_nothing(value: Any, nothing: tuple) -> bool:
    # true is not 1 and false is not 0 here: "echo": false asks for nothing, "presence_penalty": false is odd.
    return value is None or any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in nothing)
