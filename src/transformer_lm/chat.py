"""Chat templates: how a chat model's conversation (a list of {"role", "content"} messages) becomes the text it
continues, rendered as transformers' `apply_chat_template` renders it, so that an imported instruction-tuned model
(Qwen2.5-Instruct, Llama-3-Instruct, TinyLlama-Chat) sees exactly the prompt format it was tuned on.

A template is Jinja code shipped with the model (tokenizer_config.json's `chat_template`, or a chat_template.jinja
file); `tlm convert` keeps it as the run folder's chat_template.jinja, `tlm export` writes it back. It runs in Jinja's
immutable sandbox with the globals templates on the Hub use (`raise_exception`, `strftime_now`, a `tojson` that keeps
non-ASCII text), with `trim_blocks` and `lstrip_blocks` set as transformers sets them. The rendered text already
holds the model's special tokens (a BOS, the turn markers): it is encoded with them matched and no post-processor,
so that a BOS is not added twice.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ChatError
from .tokenizers import Tokenizer

_OPEN_END = "TLM_CONTINUE_FINAL_MESSAGE "
"""Put after the message a chat is to continue, to find where the template wrote its end (with the space a
template that trims would take: transformers' way)."""

CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""The run folder's chat template (and the file transformers >= 4.50 saves beside tokenizer_config.json)."""


def hf_chat_template(folder: str | Path) -> str | None:
    """The chat template of a Hugging Face model folder, found where transformers looks: chat_template.jinja, then
    chat_template.json's "chat_template", then tokenizer_config.json's (a string, or a list of named templates, of
    which the one named "default" is what apply_chat_template uses unasked). None when the folder has none."""
    folder = Path(folder)
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if not (folder / name).is_file():
            continue
        try:
            template = json.loads((folder / name).read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError) as e:
            raise ChatError(f"{folder / name} is not a JSON object ({e}); fix or remove it") from None
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str):
            return template
    return None


def read_chat_template(run: str | Path) -> str | None:
    """A run folder's chat template, or None when it has none (a base model: `tlm train`'s runs)."""
    path = Path(run) / CHAT_TEMPLATE_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


@functools.lru_cache(maxsize=8)
def _compiled(source: str) -> Any:
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}`, which training templates put around the assistant's turns
        (transformers reads it for its assistant-token masks): here the body as it is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # Jinja's own escapes HTML characters, which a prompt must not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatError(f"the chat template does not parse (line {e.lineno}: {e.message}); fix it") from None


def check_template(source: str) -> str:
    """`source` when it is a chat template Jinja can compile, else ChatError naming the line."""
    _compiled(source)
    return source


def _token(tokenizer: Tokenizer, i: int | None) -> str:
    if i is None:
        return ""
    hf = getattr(tokenizer, "hf", None)
    return hf.id_to_token(i) if hf is not None else tokenizer.decode([i])


def _messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """The conversation as plain dicts of the fields given (None-valued fields dropped, as transformers drops
    them: templates test whether a field is there); a message's content a string, which one that calls tools
    (tool_calls: [{"function": {"name", "arguments"}}, ...]) may leave out."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ChatError("a chat is a non-empty list of messages, each {'role': ..., 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                isinstance(m.get("content"), str) or (m.get("content") is None and m.get("tool_calls"))):
            raise ChatError(f"message {i} is not {{'role': str, 'content': str}}: {m!r}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def render_chat(source: str, messages: Sequence[dict[str, Any]], tokenizer: Tokenizer,
                add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None,
                continue_final_message: bool = False) -> str:
    """The text of `messages` in the chat template `source`, ending (with add_generation_prompt) in the header of the
    assistant's turn the model is to write, or with `continue_final_message` in the last message's own text, left
    open for the model to go on with (a reply begun for it: `{"role": "assistant", "content": "{"}`), as
    apply_chat_template(continue_final_message=True) ends it. The template sees `bos_token` and `eos_token` (the
    tokenizer's), and `tools`, the JSON schemas of the functions the model may call (OpenAI's [{"type":
    "function", "function": {...}}, ...], as apply_chat_template(tools=...) passes them: tool_calls.py reads the
    calls back). A conversation the template refuses (raise_exception: roles that do not alternate, say) raises
    ChatError with the template's message."""
    import jinja2

    messages = _messages(messages)
    if continue_final_message:
        if add_generation_prompt:
            raise ChatError("a chat either continues its last message or opens the assistant's next turn, not both")
        if "content" not in messages[-1]:
            raise ChatError("the last message has no content to continue")
        messages[-1] = {**messages[-1], "content": messages[-1]["content"] + _OPEN_END}
    try:
        text = _compiled(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=_token(tokenizer, tokenizer.bos_id),
                                        eos_token=_token(tokenizer, tokenizer.eot_id), tools=tools, documents=None)
    except jinja2.TemplateError as e:
        raise ChatError(f"the chat template refused the conversation: {e}") from None
    if not continue_final_message:
        return text
    at = text.rfind(_OPEN_END.strip())
    if at < 0 or text.count(_OPEN_END.strip()) > 1:  # more than once: its earlier copies would hold the mark
        raise ChatError("the chat template does not write the last message once and as it is given, so it cannot "
                        "be continued; leave continue_final_message out")
    # where the template trimmed the message's end (Llama 3's `| trim`), the text it continues is trimmed too
    return text[:at] if text.startswith(_OPEN_END, at) else text[:at].rstrip()


def encode_rendered(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of a rendered chat: its special tokens matched, no post-processor (the template wrote the BOS), as
    apply_chat_template(tokenize=True) encodes it."""
    hf = getattr(tokenizer, "hf", None)
    return hf.encode(text, add_special_tokens=False).ids if hf is not None else tokenizer.encode(text)


def chat_tokens(source: str, messages: Sequence[dict[str, Any]], tokenizer: Tokenizer,
                learn_from: int = 0) -> tuple[list[int], list[bool]]:
    """A whole conversation's ids in the template `source`, and which of them are the assistant's: its replies with
    the end-of-turn marks the template writes after them (those from message `learn_from` on: the completion of a
    prompt-completion pair), what a supervised fine-tune learns (the rest is context).
    A reply is the text the conversation up to it adds to the conversation before it with the generation prompt
    (the assistant's header), which is how it is generated; a template that renders earlier turns otherwise once
    more follow (one dropping past reasoning, say) cannot be split so and raises ChatError. The text is encoded whole
    (encode_rendered) and a token is the assistant's where its characters overlap a reply's; a tokenizer without
    offsets (byte, char: none merges across a boundary) encodes the pieces one by one."""
    messages = _messages(messages)
    if messages[0]["role"] == "assistant":
        raise ChatError("the conversation starts with the assistant's turn: there is nothing it replies to")
    text = render_chat(source, messages, tokenizer, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < learn_from:
            continue
        before = render_chat(source, messages[:i], tokenizer, add_generation_prompt=True)
        upto = render_chat(source, messages[: i + 1], tokenizer, add_generation_prompt=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ChatError(f"the chat template renders the turns before message {i} otherwise once it follows, so "
                            "the assistant's replies cannot be told from the rest; fine-tune with a template that "
                            "renders each turn the same whatever comes after (--chat_template FILE)")
        spans.append((len(before), len(upto)))
    hf = getattr(tokenizer, "hf", None)
    if hf is not None:
        enc = hf.encode(text, add_special_tokens=False)
        return enc.ids, [any(s < end and e > start for start, end in spans) for s, e in enc.offsets]
    ids, mask, at = [], [], 0
    for start, end in spans:
        for piece, learned in ((text[at:start], False), (text[start:end], True)):
            new = tokenizer.encode(piece) if piece else []
            ids += new
            mask += [learned] * len(new)
        at = end
    tail = tokenizer.encode(text[at:]) if text[at:] else []
    return ids + tail, mask + [False] * len(tail)
