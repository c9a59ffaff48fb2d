"""The bodies of the server's requests, as pydantic models.

Unknown OpenAI fields are ignored; fields that would change the answer and that the server does not
do (n > 1) are refused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SamplingRequest(BaseModel):
    """What chat and completion requests share: the model and how to sample from it."""
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text ones mean anything here
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]


class LoadAdapter(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapter(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM's lora_int_id
    lora_name: str = Field(min_length=1)


class SetAlias(BaseModel):
    alias: str = Field(min_length=1)
    model: str = Field(min_length=1)


class Feedback(BaseModel):
    id: str
    score: float | None = None
    thumbs: Literal["up", "down"] | bool | None = None
    label: str | None = None
    comment: str = ""
