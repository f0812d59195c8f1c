"""Tool calls in a chat model's reply: the function calls a model tuned for tools writes in its own format, read
back as OpenAI's chat completions return them ({"name", "arguments"}), whole or as a reply streams.

Two formats cover the open models whose chat templates render `tools`:
- "hermes": each call a JSON object {"name", "arguments"} between <tool_call> and </tool_call>, after any text
  (Qwen2.5 and Qwen3, Hermes, and others trained on that format);
- "json": the reply is the call itself, a JSON object {"name", "parameters" or "arguments"} or several (a list, or
  objects one after another), after an optional <|python_tag|> (Llama 3.1-3.3) or [TOOL_CALLS] (Mistral).
`tool_call_style` picks one from the template, as a reader of it would: the hermes tag if it writes one, else
JSON. A reply whose calls do not parse is returned as text, never half-read (as vLLM's parsers do).
"""

from __future__ import annotations

import json
import re
import secrets
import string
import uuid
from collections.abc import Collection
from typing import Any

TOOL_CALL_STYLES = ("hermes", "json")
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_JSON_PREFIXES = ("<|python_tag|>", "[TOOL_CALLS]")
_HERMES_CALL = re.compile(re.escape(_OPEN) + r"(.*?)(?:" + re.escape(_CLOSE) + r"|\Z)", re.DOTALL)


def tool_call_style(template: str | None) -> str | None:
    """The format a model with chat template `template` writes tool calls in (TOOL_CALL_STYLES), or None when the
    template never reads `tools` (a model that was not tuned to call them)."""
    if template is None or not re.search(r"\btools\b", template):
        return None
    return "hermes" if _OPEN in template else "json"


def _call(obj: Any) -> dict[str, Any] | None:
    """{"name", "arguments": dict} of one parsed call, or None when `obj` is not one (a JSON answer that merely has
    a "name" is not: a call names its arguments or parameters too)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or \
            not ("arguments" in obj or "parameters" in obj):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string, as OpenAI returns them
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return {"name": obj["name"], "arguments": args} if isinstance(args, dict) else None


def _json_calls(text: str) -> list[dict[str, Any]] | None:
    """The calls of a reply that is nothing but JSON calls (objects, or lists of them, separated by whitespace, `;`
    or `,`), or None."""
    decoder, at, calls = json.JSONDecoder(), 0, []
    while True:
        while at < len(text) and (text[at].isspace() or text[at] in ";,"):
            at += 1
        if at == len(text):
            return calls or None
        try:
            obj, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        for one in obj if isinstance(obj, list) else [obj]:
            if (call := _call(one)) is None:
                return None
            calls.append(call)


def _split(text: str, style: str, names: Collection[str] | None) -> tuple[int, list[dict[str, Any]]] | None:
    """(where the calls begin in `text`, the calls), or None when the reply holds none that parse, or (with
    `names`) one of a function not among them."""
    found = _find(text, style)
    if found is None or (names is not None and any(c["name"] not in names for c in found[1])):
        return None
    return found


def _find(text: str, style: str) -> tuple[int, list[dict[str, Any]]] | None:
    if style == "hermes":
        start = text.find(_OPEN)
        if start < 0:
            return None
        calls = []
        for body in _HERMES_CALL.findall(text, start):
            try:
                call = _call(json.loads(body))
            except ValueError:
                return None
            if call is None:
                return None
            calls.append(call)
        return start, calls
    start = len(text) - len(text.lstrip())
    body = text[start:]
    for prefix in _JSON_PREFIXES:
        body = body.removeprefix(prefix)
    calls = _json_calls(body)
    return None if calls is None else (start, calls)


def parse_tool_calls(text: str, style: str,
                     names: Collection[str] | None = None) -> tuple[str | None, list[dict[str, Any]]]:
    """(the reply's text, its tool calls as {"name", "arguments": dict}) of a reply in `style`: with calls, the
    text before them (None where there is none); a reply whose calls do not parse, or (with `names`, the tools
    offered) that calls a function not offered, is all text, with no calls."""
    found = _split(text, style, names)
    if found is None:
        return text, []
    start, calls = found
    return text[:start].strip() or None, calls


class ToolCallStream:
    """A streamed reply split as it comes: `feed` returns the text that can be sent at once, holding back what may
    begin a tool call (a tail that could be the start of <tool_call>; in the JSON style, a reply that opens with
    `{`, `[` or a call prefix), and `finish` returns the rest of the text and the calls, as parse_tool_calls reads
    the whole reply."""

    def __init__(self, style: str, names: Collection[str] | None = None) -> None:
        self.style, self.names, self.text, self.sent = style, names, "", 0

    def _safe(self) -> int:
        """How much of the text so far is surely not a tool call's."""
        text = self.text
        if self.style == "hermes":
            start = text.find(_OPEN)
            if start >= 0:
                return start
            keep = next((n for n in range(min(len(_OPEN) - 1, len(text)), 0, -1) if _OPEN.startswith(text[-n:])), 0)
            return len(text) - keep
        head = text.lstrip()
        if self.sent or (head and not any(p.startswith(head[: len(p)]) for p in ("{", "[", *_JSON_PREFIXES))):
            return len(text)  # the reply began as text: it is no JSON call
        return 0

    def feed(self, piece: str) -> str:
        self.text += piece
        safe = max(self.sent, self._safe())
        out, self.sent = self.text[self.sent : safe], safe
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(the text not sent yet, the calls): without calls that parse, all the text held back."""
        found = _split(self.text, self.style, self.names)
        if found is None or found[0] < self.sent:
            return self.text[self.sent :], []
        return self.text[self.sent : found[0]], found[1]


def short_call_ids(template: str | None) -> bool:
    """Whether the template takes tool call ids of 9 letters and digits only (Mistral's refuse any other, as the
    calls come back in the next request's messages)."""
    return template is not None and "[TOOL_CALLS]" in template


def openai_tool_calls(calls: list[dict[str, Any]], parallel: bool = True,
                      short_ids: bool = False) -> list[dict[str, Any]]:
    """Parsed calls as OpenAI's chat completions return them, each with a new id ("call_" and 24 hex digits, or
    with `short_ids` 9 letters and digits) and its arguments as JSON text; without `parallel`, the first alone."""
    def new_id() -> str:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9)) if short_ids else \
            f"call_{uuid.uuid4().hex[:24]}"

    return [{"id": new_id(), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls[: None if parallel else 1]]
