"""The request bodies `tlm serve` takes: OpenAI's completions and chat completions fields (and top_k), checked by
pydantic; a field left out takes the server's default, an unknown one is refused by name."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from .config import SampleConfig


class BadRequest(Exception):
    """A request refused before anything is generated: its message, the field at fault, the HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    """Send one more event before [DONE] with the token counts (its `choices` empty), as OpenAI does."""


class SamplingRequest(BaseModel):
    """The fields POST /v1/completions and /v1/chat/completions share: OpenAI's sampling fields and `top_k`.
    Sampling fields left out take the server's defaults (`tlm serve --temperature ... --num_samples` for n); unknown
    fields are refused, so a misspelt one cannot go unnoticed."""

    model_config = ConfigDict(extra="forbid")
    unsupported: ClassVar[dict[str, Any]] = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None}
    """OpenAI's fields this server has no implementation of, with the values that ask for nothing: a request that
    sets another value is refused by name rather than answered as if it had not asked."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=128)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def scored(self) -> int | None:
        """How many of the likeliest tokens each token's logprobs lists, or None when logprobs are not asked."""
        return None

    def new_tokens(self) -> int | None:
        return self.max_tokens

    def sample_config(self, defaults: SampleConfig) -> SampleConfig:
        """The server's sampling defaults with this request's fields over them (checked by SampleConfig)."""
        for field, neutral in self.unsupported.items():
            if getattr(self, field) not in (neutral, None):
                raise BadRequest(f"{field} is not supported by this server; leave it out", field)
        if self.scored() is not None and self.stream:
            raise BadRequest("logprobs come with the whole response here: leave stream out", "stream")
        given = {"max_new_tokens": self.new_tokens(), "temperature": self.temperature, "top_p": self.top_p,
                 "top_k": self.top_k, "seed": self.seed, "num_samples": self.n}
        changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if self.temperature is not None:
            changes["greedy"] = False  # a request's temperature wins over the server's --greedy (0 is greedy too)
        if self.stop is not None:
            changes["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return dataclasses.replace(defaults, **changes)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    """The body of POST /v1/completions."""

    unsupported: ClassVar[dict[str, Any]] = {**SamplingRequest.unsupported, "suffix": None, "best_of": 1}
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    """Text, or token ids of this run's tokenizer (as evaluation harnesses send them), one prompt or a list."""
    echo: bool = False
    """Put the prompt before each completion's text."""
    logprobs: int | None = Field(None, ge=0, le=20)
    """Each token's log-probability and the `logprobs` likeliest tokens at its place, for the completion (and the
    prompt with echo): with echo and max_tokens 0 or 1, how evaluation harnesses score a text."""
    suffix: str | None = None
    best_of: int | None = 1

    def scored(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        one = isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int))
        prompts = [self.prompt] if one else self.prompt
        if not prompts or any(p == [] for p in prompts):
            raise BadRequest("prompt is an empty list; give a string or token ids, or a list of them", "prompt")
        return prompts


class TextPart(BaseModel):
    """A part of a message's content, as OpenAI's clients may send it: text only (a language model has no eyes)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str | list[TextPart]
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        """The message as a chat template reads it: its content one string (text parts joined by newlines, as
        vLLM joins them)."""
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": self.role, "content": content, **({"name": self.name} if self.name is not None else {})}


class ChatRequest(SamplingRequest):
    """The body of POST /v1/chat/completions: the conversation, rendered in the run's chat template (chat.py)."""

    unsupported: ClassVar[dict[str, Any]] = {**SamplingRequest.unsupported, "tools": None, "tool_choice": None,
                                             "functions": None, "function_call": None, "response_format": None}
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    """OpenAI's newer name of max_tokens (which it still takes): this one wins where both are given."""
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: Any = None

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def scored(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None
