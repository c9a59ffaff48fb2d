"""The bodies of the server's requests, as pydantic models.

Sampling fields are checked here, at the edge, so a bad value is the client's 400 naming the field
and never reaches a batch shared with other requests: a temperature between 0 and ``TEMPERATURE_FLOOR``
(whose probabilities overflow to nan), a seed beyond what a torch generator takes, unbounded stop
lists, messages and strings. ``response_format`` is checked here for its shape, and at the route for
its schema (``serve/structured.py``: a schema that cannot be enforced is a 400). Fields outside these
models are looked up in ``serve/unsupported.py``: refused when they would change the answer, ignored
when they would not.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tunesmith.store.db import MAX_COMMENT_CHARS, MAX_LABEL_CHARS

TEMPERATURE_FLOOR = 0.01  # below it (and above 0), logits / temperature overflow in float32
MAX_SEED = 2**63 - 1  # a signed 64-bit integer, as torch's generators and most clients take it
MAX_MESSAGES = 256
MAX_TEXT_CHARS = 100_000  # one message, one prompt; the token cap applies after it
MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat route


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")  # include_obfuscation: nothing to obfuscate here
    include_usage: bool = False


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    """Any JSON object (OpenAI's JSON mode)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["json_object"]


class JsonSchema(BaseModel):
    """OpenAI's ``json_schema``: the answer is JSON valid against ``schema`` (whether ``strict`` or not:
    this server always enforces it; a schema it cannot enforce is refused, never loosened)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # none: any JSON value
    strict: bool | None = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class SamplingRequest(BaseModel):
    """What chat and completion requests share: the model and how to sample from it.

    ``extra="allow"`` keeps the fields not declared here, for ``unsupported.refused`` to judge.
    """

    model_config = ConfigDict(extra="allow")
    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)  # the server caps it at --max-batch
    response_format: ResponseFormat | None = None

    @field_validator("temperature")
    @classmethod
    def _greedy_or_above_the_floor(cls, value: float) -> float:
        if 0 < value < TEMPERATURE_FLOOR:
            raise ValueError(f"temperature must be 0 (greedy) or at least {TEMPERATURE_FLOOR}")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else [] if value is None else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        return [s for s in stops if s]

    def top_logprobs_wanted(self) -> int | None:
        """How many most likely tokens to return with each token's log-probability (None: no logprobs)."""
        return None


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    if len(value) > MAX_TEXT_CHARS:
        raise ValueError(f"{what} has {len(value)} characters; at most {MAX_TEXT_CHARS}")
    return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name: the chat template has no place for it
    # No tool or function messages: tool calling is refused (serve/unsupported.py).
    role: Literal["system", "developer", "user", "assistant"]
    content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value):
        """A string, or content parts of type text (joined); an image or audio part is refused, not dropped."""
        if value is None or isinstance(value, str):
            return None if value is None else _text(value, "content")
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of content parts")
        texts = []
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"part {i} is of type {kind!r}; this server takes text parts only")
            texts.append(_text(part.get("text"), f"part {i}'s text"))
        return _text("".join(texts), "content")

    def text(self) -> str:
        return self.content or ""


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value, info):
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: str
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):  # OpenAI takes a batch of prompts; this server one per request
            if len(value) != 1:
                raise ValueError("one prompt per request")
            value = value[0]
        return _text(value, "prompt")

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


class LoadAdapter(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapter(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM's lora_int_id
    lora_name: str = Field(min_length=1)


class SetAlias(BaseModel):
    alias: str = Field(min_length=1)
    model: str = Field(min_length=1)


MAX_SCORED_TEXTS = 64


class ScoreRequest(BaseModel):
    """Texts for a served scorer (``/v1/score``), read as answers to ``prompt`` when it is given."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=256)
    input: list[Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]] = Field(
        min_length=1, max_length=MAX_SCORED_TEXTS)
    prompt: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS)


class Feedback(BaseModel):
    """A rating of a logged answer, by its completion id: a score, thumbs or the right label, and a comment."""

    id: str = Field(min_length=1, max_length=128)
    score: float | None = Field(None, allow_inf_nan=False)
    thumbs: Literal["up", "down"] | bool | None = None
    label: str | None = Field(None, min_length=1, max_length=MAX_LABEL_CHARS)
    comment: str = Field("", max_length=MAX_COMMENT_CHARS)
