"""Tool calling: tools and past calls rendered in a chat template as transformers' apply_chat_template(tools=...)
renders them; calls read back from a reply in the two formats open models write (tool_calls.py), whole and as a
reply streams; and `tlm serve` answering OpenAI's client with tool_calls, round trip included, from a model whose
greedy reply is scripted position by position. CPU only, downloads nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import chat_rust_tokenizer
from transformer_lm.api import Run, load_run
from transformer_lm.chat import CHAT_TEMPLATE_FILE, render_chat
from transformer_lm.checkpoint import save_checkpoint
from transformer_lm.config import ModelConfig, SampleConfig, dump_json
from transformer_lm.errors import ChatError
from transformer_lm.model import Transformer
from transformer_lm.tokenizers import HFFileTokenizer, save_tokenizer
from transformer_lm.tool_calls import ToolCallStream, parse_tool_calls, tool_call_style

# A template in the style of Qwen2.5's: the tools' schemas in the system turn, each call as a <tool_call> JSON
# object, a tool's result as a user turn wrapped in <tool_response>.
HERMES = (
    "{%- if tools %}<|im_start|>system\nYou may call these functions:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{%- for call in m.tool_calls or [] %}<tool_call>"
    "{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Today's weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
ASK = [{"role": "user", "content": "Weather in Zürich?"}]
CALL = {"name": "weather", "arguments": {"city": "Zürich"}}
ANSWERED = [*ASK, {"role": "assistant", "content": "Let me look.",
                   "tool_calls": [{"id": "call_1", "type": "function", "function": CALL}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"celsius\": 21}"}]


@pytest.fixture(scope="module")
def tokenizer() -> HFFileTokenizer:
    return HFFileTokenizer(chat_rust_tokenizer(), eot="<|im_end|>")


def test_tools_and_past_calls_render_as_transformers_renders_them(tokenizer):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=chat_rust_tokenizer(), eos_token="<|im_end|>")
    for messages in (ASK, ANSWERED):
        text = render_chat(HERMES, messages, tokenizer, tools=TOOLS)
        assert text == theirs.apply_chat_template(messages, tools=TOOLS, chat_template=HERMES, tokenize=False,
                                                  add_generation_prompt=True)
    assert '"name": "weather", "description"' in text  # the schema, and the past call as the model wrote it
    assert 'Let me look.<tool_call>{"name": "weather", "arguments": {"city": "Zürich"}}</tool_call>' in text
    assert render_chat(HERMES, ASK, tokenizer) == ("<|im_start|>user\nWeather in Zürich?<|im_end|>\n"
                                                   "<|im_start|>assistant\n")


def test_the_calls_format_is_the_templates():
    assert tool_call_style(HERMES) == "hermes"
    assert tool_call_style("{% if tools %}{{ tools | tojson }}{% endif %}{{ messages[0].content }}") == "json"
    assert tool_call_style("{{ messages[0].content }}") is None and tool_call_style(None) is None


@pytest.mark.parametrize("text, style, content, calls", [
    ('<tool_call>\n{"name": "weather", "arguments": {"city": "Zürich"}}\n</tool_call>', "hermes", None, [CALL]),
    ('Let me look.\n<tool_call>{"name": "weather", "arguments": {"city": "Zürich"}}</tool_call>\n'
     '<tool_call>{"name": "time", "arguments": {}}</tool_call>', "hermes", "Let me look.",
     [CALL, {"name": "time", "arguments": {}}]),
    ('<tool_call>{"name": "weather", "arguments": "{\\"city\\": \\"Zürich\\"}"}', "hermes", None, [CALL]),  # unclosed
    ('<tool_call>{"name": "weather", "arguments": {"city": </tool_call>', "hermes", "<same>", []),  # no JSON
    ('<tool_call>{"arguments": {}}</tool_call>', "hermes", "<same>", []),  # no name
    ("It is sunny.", "hermes", "It is sunny.", []),
    (' {"name": "weather", "parameters": {"city": "Zürich"}}', "json", None, [CALL]),  # Llama 3.1
    ('<|python_tag|>{"name": "weather", "parameters": {"city": "Zürich"}}; {"name": "time", "parameters": {}}',
     "json", None, [CALL, {"name": "time", "arguments": {}}]),
    ('[TOOL_CALLS] [{"name": "weather", "arguments": {"city": "Zürich"}}]', "json", None, [CALL]),  # Mistral
    ('{"name": "weather", "parameters": {"city": "Zürich"}} and then', "json", "<same>", []),
    ('{"city": "Zürich"}', "json", "<same>", []),
    ('{"name": "Zürich", "population": 421878}', "json", "<same>", []),  # an answer in JSON, not a call
    ("Sunny, 21 degrees.", "json", "Sunny, 21 degrees.", []),
])
def test_calls_are_read_from_a_reply_and_anything_else_is_text(text, style, content, calls):
    assert parse_tool_calls(text, style) == (text if content == "<same>" else content, calls)
    if calls:  # a call of a function not offered is text too
        assert parse_tool_calls(text, style, {"weather"}) == ((text, []) if len(calls) > 1 else
                                                             (content, calls))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["", "Let me look. ", "<tool", "a < b ", "{not json", " "]),
       st.sampled_from(["", '<tool_call>{"name": "weather", "arguments": {"city": "Zürich"}}</tool_call>',
                        '{"name": "weather", "parameters": {"city": "Zürich"}}', "<tool_call>{broken"]),
       st.sampled_from(["hermes", "json"]), st.lists(st.integers(0, 200), max_size=8))
def test_a_streamed_reply_sends_what_the_whole_one_holds(head, call, style, cuts):
    """However the reply is cut into pieces, the text sent as it comes and at the end is the whole reply's text (all
    of it where no call parses, else what comes before the calls), and the calls are the whole reply's."""
    text = head + call
    stream = ToolCallStream(style)
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    sent = "".join(stream.feed(text[a:b]) for a, b in zip(bounds, bounds[1:]))
    rest, calls = stream.finish()
    content, whole_calls = parse_tool_calls(text, style)
    assert calls == whole_calls
    assert sent + rest == (text[: text.index(call.strip()[:1]) if style == "json" else text.index("<tool_call>")]
                           if calls else text)
    assert content == ((sent + rest).strip() or None if calls else text)


def _scripted_run(folder: Path, tokenizer: HFFileTokenizer, replies: dict[int, list[int]]) -> Run:
    """A run whose greedy reply after a prompt of n tokens is replies[n]: the model sees positions only (one-hot
    position embeddings, no token embeddings, blocks that add nothing), and its LM head maps the position before
    each scripted token to that token."""
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=512, n_layer=1, n_head=4, n_embd=512,
                         tie_embeddings=False)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight")) else 0.0)
        model.pos_emb.weight.copy_(torch.eye(512))
        for n, ids in replies.items():
            for k, token in enumerate(ids):
                model.lm_head.weight[token, n - 1 + k] = 10.0
    folder.mkdir()
    (folder / "config.json").write_text(dump_json({"model": config.to_dict()}))
    save_tokenizer(tokenizer, folder / "tokenizer.json")
    (folder / CHAT_TEMPLATE_FILE).write_text(HERMES)
    save_checkpoint(folder, model, {}, 0)
    return load_run(folder, "cpu")


def test_the_server_answers_openais_client_with_tool_calls_round_trip(tokenizer, tmp_path):
    """The model asks for the weather (a hermes call), the client runs it and sends the result back, and the model
    answers: whole and streamed, with OpenAI's own client."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from transformer_lm.serve import create_app

    end = tokenizer.hf.token_to_id("<|im_end|>")
    call_text = 'Let me look.<tool_call>{"name": "weather", "arguments": {"city": "Zürich"}}</tool_call>'
    ids = {}
    for messages in (ASK, ANSWERED):  # the prompts the server renders: the same template, tools and tokenizer
        ids[len(ids)] = len(encode(tokenizer, render_chat(HERMES, messages, tokenizer, tools=TOOLS)))
    run = _scripted_run(tmp_path / "scripted", tokenizer, {
        ids[0]: encode(tokenizer, call_text) + [end], ids[1]: encode(tokenizer, "It is 21 °C.") + [end]})
    client = TestClient(create_app(run, SampleConfig(max_new_tokens=160), concurrency=2))
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)

    reply = api.chat.completions.create(model=run.path.name, messages=ASK, tools=TOOLS, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Zürich"}

    chunks = list(api.chat.completions.create(model=run.path.name, messages=ASK, tools=TOOLS, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me look."
    streamed = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in streamed] == [
        (0, "weather", {"city": "Zürich"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    history = [*ASK, choice.message.model_dump(),  # as the SDK dumps it: its empty refusal, audio ... too
               {"role": "tool", "tool_call_id": call.id, "content": "{\"celsius\": 21}"}]
    answer = api.chat.completions.create(model=run.path.name, messages=history, tools=TOOLS, temperature=0)
    assert answer.choices[0].message.content == "It is 21 °C." and answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.tool_calls is None
    # tool_choice "none": the tools are not shown, nor a reply read for calls
    none = api.chat.completions.create(model=run.path.name, messages=ASK, tools=TOOLS, tool_choice="none",
                                       max_tokens=2)
    assert none.usage.prompt_tokens == len(encode(tokenizer, render_chat(HERMES, ASK, tokenizer)))
    with pytest.raises(openai.BadRequestError, match="would force a call"):
        api.chat.completions.create(model=run.path.name, messages=ASK, tools=TOOLS, tool_choice="required")


def encode(tokenizer: HFFileTokenizer, text: str) -> list[int]:
    return tokenizer.hf.encode(text, add_special_tokens=False).ids


def test_a_mistral_template_gets_call_ids_it_takes_back(tokenizer):
    """Mistral's templates refuse tool call ids other than 9 letters and digits when the calls come back: the ids
    made for a [TOOL_CALLS] template are such, and the next request renders."""
    import re

    from transformer_lm.tool_calls import openai_tool_calls, short_call_ids

    mistral = ("{% for m in messages %}{% for c in m.tool_calls or [] %}{% if c.id | length != 9 %}"
               "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{% endif %}"
               "[TOOL_CALLS]{{ c.function | tojson }}{% endfor %}{{ m.content or '' }}{% endfor %}"
               "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}{% endif %}")
    assert short_call_ids(mistral) and not short_call_ids(HERMES)
    made = openai_tool_calls([CALL], short_ids=True)[0]
    assert re.fullmatch(r"[A-Za-z0-9]{9}", made["id"])
    history = [*ASK, {"role": "assistant", "tool_calls": [{**made, "function": CALL}]}]
    assert '[TOOL_CALLS]{"name": "weather"' in render_chat(mistral, history, tokenizer, tools=TOOLS)
    with pytest.raises(ChatError, match="length 9"):
        render_chat(mistral, [*ASK, {"role": "assistant", "tool_calls": [
            {**openai_tool_calls([CALL])[0], "function": CALL}]}], tokenizer)
