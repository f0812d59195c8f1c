"""The request bodies `tlm serve` takes: OpenAI's completions and chat completions fields (and top_k), checked by
pydantic; a field left out takes the server's default, an unknown one is refused by name."""

from __future__ import annotations

import dataclasses
import json
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


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str
    """A JSON object's text, as OpenAI writes it."""


class ToolCall(BaseModel):
    """A call the assistant made, sent back in the conversation with the tool's result after it."""

    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """The arguments' JSON schema."""
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    """The assistant's calls (its content may then be None)."""
    tool_call_id: str | None = None
    """A tool's result (role "tool"): the call it answers."""
    refusal: None = None
    annotations: None = None
    audio: None = None
    function_call: None = None
    """The fields of OpenAI's assistant message this server never fills, taken empty: a client that sends a reply
    back as the SDK dumps it (`message.model_dump()`) sends them so."""

    def as_dict(self) -> dict[str, Any]:
        """The message as a chat template reads it: its content one string (text parts joined by newlines, as
        vLLM joins them), and its tool calls' arguments parsed (templates write them with `tojson`, as
        transformers documents them: a dict, where OpenAI sends JSON text)."""
        content = self.content if self.content is None or isinstance(self.content, str) else \
            "\n".join(p.text for p in self.content)
        message: dict[str, Any] = {"role": self.role, "content": content, "name": self.name,
                                   "tool_call_id": self.tool_call_id}
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
                "name": c.function.name, "arguments": _arguments(c.function)}} for c in self.tool_calls]
        return {k: v for k, v in message.items() if v is not None}


def _arguments(call: FunctionCall) -> dict[str, Any]:
    try:
        args = json.loads(call.arguments)
    except ValueError:
        args = None
    if not isinstance(args, dict):
        raise BadRequest(f"the arguments of a call of {call.name!r} are not a JSON object's text: "
                         f"{call.arguments!r}", "messages")
    return args


class ChatRequest(SamplingRequest):
    """The body of POST /v1/chat/completions: the conversation, rendered in the run's chat template (chat.py)."""

    unsupported: ClassVar[dict[str, Any]] = {**SamplingRequest.unsupported, "functions": None,
                                             "function_call": None, "response_format": None}
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    """OpenAI's newer name of max_tokens (which it still takes): this one wins where both are given."""
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    """Functions the model may call, shown it by the chat template; its calls come back parsed (tool_calls.py)."""
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    """False: at most one call a reply (the first, where the model writes more)."""
    continue_final_message: bool = False
    """vLLM's: the reply goes on from the last message's text (an assistant's reply begun for the model), instead
    of opening a new turn; the response holds what the model adds."""
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: Any = None

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def tool_schemas(self) -> list[dict[str, Any]] | None:
        """The tools to show the model: none with tool_choice "none". Forcing a call ("required", or a function
        named) would take constrained decoding, which this server does not do: refused by name."""
        if self.tool_choice not in (None, "auto", "none"):
            raise BadRequest(f"tool_choice {self.tool_choice!r} would force a call, which this server cannot (it "
                             "has no constrained decoding); use \"auto\" (the model decides) or \"none\"",
                             "tool_choice")
        if not self.tools or self.tool_choice == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def scored(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None
