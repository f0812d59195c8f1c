"""Chat templates (chat.py) and chat completions: conversations rendered and encoded as transformers'
apply_chat_template renders and encodes them (templates written here in the styles of published ones: ChatML with a
default system prompt, Llama 3's BOS and role checks, one using tojson, loop controls, a namespace and a generation
block); a tiny ChatML model imported with its template replies as transformers' generate does on that prompt, and
its export carries the template back; `tlm serve`'s POST /v1/chat/completions answers in OpenAI's chat shapes with
those replies. CPU only, downloads nothing."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from conftest import chat_rust_tokenizer, edit_json
from transformer_lm.api import load_run
from transformer_lm.chat import CHAT_TEMPLATE_FILE, check_template, encode_rendered, hf_chat_template, render_chat
from transformer_lm.cli import main
from transformer_lm.config import SampleConfig
from transformer_lm.errors import ChatError
from transformer_lm.interop.hf import export_hf, import_hf
from transformer_lm.tokenizers import HFFileTokenizer

transformers = pytest.importorskip("transformers")

CHATML = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

LLAMA3 = (
    "{% set offset = 1 if messages[0]['role'] == 'system' else 0 %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != ((loop.index0 - offset) % 2 == 0) and message['role'] != 'system' %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

TOOLISH = (
    "{%- set ns = namespace(turns=0) -%}\n"
    "{%- for m in messages -%}\n"
    "  {%- if m.role == 'system' %}{% continue %}{% endif -%}\n"
    "  {%- set ns.turns = ns.turns + 1 -%}\n"
    "  {{ ns.turns }}: {{ m | tojson }}{% if m.name is defined %} ({{ m.name }}){% endif %}\n"
    "  {%- if m.role == 'assistant' %}{% generation %} {{ m.content }}{{ eos_token }}{% endgeneration %}{% endif %}\n"
    "    {% if loop.last %}(last){% endif %}\n"
    "{% endfor -%}\n"
    "{%- if add_generation_prompt %}<|im_start|>{% endif %}"
)

CHATS = [
    [{"role": "user", "content": "def alpha(beta):"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " naïve größe ✓ \n"},
     {"role": "assistant", "content": "return beta * 2"}, {"role": "user", "content": "x = [1, 2]"}],
    [{"role": "user", "content": "alpha", "name": "beta"}, {"role": "assistant", "content": "<b>\"beta\"</b>"}],
]


@pytest.fixture(scope="module")
def tokenizers():
    """Ours and transformers' views of one tokenizer, which puts a BOS before every text it encodes (as Llama's
    do): a rendered chat has the template's BOS, not a second one."""
    from tokenizers.processors import TemplateProcessing

    rust = chat_rust_tokenizer()
    rust.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
        ("<|begin_of_text|>", rust.token_to_id("<|begin_of_text|>"))])
    ours = HFFileTokenizer(rust, eot="<|im_end|>", bos="<|begin_of_text|>")
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<|begin_of_text|>",
                                                  eos_token="<|im_end|>")
    return ours, theirs


def _their_ids(tok, messages, template=None, add_generation_prompt=True) -> list[int]:
    out = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=add_generation_prompt,
                                  tokenize=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


@pytest.mark.parametrize("template", [CHATML, LLAMA3, TOOLISH], ids=["chatml", "llama3", "tojson-generation"])
@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_and_ids_equal_transformers_apply_chat_template(tokenizers, template, chat, add_generation_prompt):
    ours, theirs = tokenizers
    messages = CHATS[chat]
    text = render_chat(template, messages, ours, add_generation_prompt)
    assert text == theirs.apply_chat_template(messages, chat_template=template, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    assert encode_rendered(ours, text) == _their_ids(theirs, messages, template, add_generation_prompt)
    assert "<|im_start|>" not in text or theirs.convert_tokens_to_ids("<|im_start|>") in encode_rendered(ours, text)



@pytest.mark.parametrize("template", [CHATML, LLAMA3], ids=["chatml", "llama3"])
def test_a_begun_reply_is_left_open_as_transformers_leaves_it(tokenizers, template):
    """continue_final_message: the text ends inside the last message (Llama 3's template trims it: so does the
    text), as apply_chat_template(continue_final_message=True) ends it. A template that writes the message twice
    (TOOLISH: as JSON, then as text) cannot be continued (transformers leaves its mark in the first copy)."""
    ours, theirs = tokenizers
    for begun in ("return beta", "return beta "):
        messages = [*CHATS[1][:2], {"role": "assistant", "content": begun}]
        text = render_chat(template, messages, ours, add_generation_prompt=False, continue_final_message=True)
        assert text == theirs.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  continue_final_message=True)
        assert text.rstrip().endswith("return beta")
    with pytest.raises(ChatError, match="not both"):
        render_chat(template, messages, ours, add_generation_prompt=True, continue_final_message=True)
    for other in ("{{ messages | length }}", TOOLISH):
        with pytest.raises(ChatError, match="cannot be continued"):
            render_chat(other, messages, ours, add_generation_prompt=False, continue_final_message=True)


def test_a_refused_conversation_and_a_broken_template_are_one_line_errors(tokenizers):
    ours, _ = tokenizers
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatError, match="refused the conversation: Conversation roles must alternate"):
        render_chat(LLAMA3, twice, ours)
    with pytest.raises(ChatError, match=r"does not parse \(line 2: .*endfor"):
        check_template("{% for m in messages %}\n{{ m }}")
    for bad in ([], "hello", [{"role": "user"}], [{"role": "user", "content": ["a"]}]):
        with pytest.raises(ChatError, match="message|non-empty list"):
            render_chat(CHATML, bad, ours)


def test_the_template_is_found_where_transformers_looks(tmp_path):
    assert hf_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A"}))
    assert hf_chat_template(tmp_path) == "A"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert hf_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert hf_chat_template(tmp_path) == "J"
    (tmp_path / "chat_template.jinja").write_text("F")
    assert hf_chat_template(tmp_path) == "F"


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object, Path]:
    """A tiny Qwen2 chat model saved with a ChatML template, <|im_end|> its end of turn (tokenizer_config's
    eos_token, as Qwen2.5-Instruct's): the LM head row of <|im_end|> is that of the 4th token greedy decoding draws
    after CHATS[0]'s prompt, scaled up, so that the reply to it ends there."""
    rust = chat_rust_tokenizer()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=rust, eos_token="<|im_end|>", chat_template=CHATML)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                                      vocab_size=rust.get_vocab_size(), eos_token_id=im_end)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        prompt = torch.tensor([_their_ids(tok, CHATS[0])])
        free = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, prompt.shape[1]:].tolist()
        model.lm_head.weight[im_end] = model.lm_head.weight[free[3]] * 1.5
    folder = tmp_path_factory.mktemp("hf-chat")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder


def _their_reply(model, tok, messages, max_new_tokens=8, ended=False) -> str:
    """transformers' greedy reply (and, with `ended`, that it ended at the end-of-turn token, not at max_new_tokens)."""
    ids = _their_ids(tok, messages)
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    assert not ended or out[-1] == tok.eos_token_id and len(out) < max_new_tokens
    return tok.decode([i for i in out if i != tok.eos_token_id])


@pytest.fixture(scope="module")
def chat_run(chat_folder, tmp_path_factory: pytest.TempPathFactory):
    return load_run(import_hf(chat_folder[2], tmp_path_factory.mktemp("runs") / "chat"), "cpu")


def test_an_imported_chat_model_replies_as_transformers_generate_does(chat_folder, chat_run):
    model, tok, _ = chat_folder
    assert (chat_run.path / CHAT_TEMPLATE_FILE).read_text() == CHATML
    first = chat_run.chat(CHATS[0], greedy=True, max_new_tokens=8)
    assert first == _their_reply(model, tok, CHATS[0], ended=True)
    assert chat_run.chat(CHATS[1], greedy=True, max_new_tokens=8) == _their_reply(model, tok, CHATS[1])
    assert "".join(chat_run.stream_chat(CHATS[1], greedy=True, max_new_tokens=8)) == _their_reply(model, tok,
                                                                                                   CHATS[1])


def test_the_template_is_imported_from_tokenizer_config_and_exported_back(chat_folder, chat_run, tmp_path):
    _, tok, folder = chat_folder
    legacy = tmp_path / "legacy"  # the form of folders saved before chat_template.jinja: the string in the config
    legacy.mkdir()
    for f in folder.iterdir():
        if f.name != CHAT_TEMPLATE_FILE:
            (legacy / f.name).write_bytes(f.read_bytes())
    edit_json(legacy / "tokenizer_config.json", chat_template=LLAMA3)
    assert load_run(import_hf(legacy, tmp_path / "run"), "cpu").chat_template == LLAMA3
    export = export_hf(chat_run.path, tmp_path / "export")
    # (qwen2's AutoTokenizer would swap in Qwen2's own pre-tokenizer: write_tokenizer warns so)
    back = transformers.PreTrainedTokenizerFast.from_pretrained(export)
    assert back.chat_template == CHATML
    for messages in CHATS[:2]:
        assert _their_ids(back, messages) == _their_ids(tok, messages)


def test_a_template_that_does_not_compile_is_left_out_with_a_warning(chat_folder, tmp_path, caplog):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in chat_folder[2].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / CHAT_TEMPLATE_FILE).write_text("{% if %}")
    run = load_run(import_hf(bad, tmp_path / "run"), "cpu")
    assert run.chat_template is None and "imported without it" in caplog.text
    with pytest.raises(ChatError, match="has no chat template .* --chat_template FILE"):
        run.chat(CHATS[0])


# --- POST /v1/chat/completions ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(chat_run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from transformer_lm.serve import create_app

    return TestClient(create_app(chat_run, concurrency=4))


def _chat(client, **body) -> dict:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_completion_is_the_libraries_reply(client, chat_run):
    out = _chat(client, messages=CHATS[0], max_tokens=8, temperature=0)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-") and out["model"] == "chat"
    reply = chat_run.chat(CHATS[0], greedy=True, max_new_tokens=8)
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": reply}, "logprobs": None,
                               "finish_reason": "stop"}]
    prompt_ids = encode_rendered(chat_run.tokenizer, render_chat(CHATML, CHATS[0], chat_run.tokenizer))
    assert out["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 4, "total_tokens":
                            len(prompt_ids) + 4}  # the <|im_end|> drawn counts, as OpenAI's does
    longer = _chat(client, messages=CHATS[1], max_completion_tokens=5, max_tokens=50, temperature=0)["choices"][0]
    assert longer["message"]["content"] == chat_run.chat(CHATS[1], greedy=True, max_new_tokens=5)
    assert longer["finish_reason"] == "length"
    begun = [*CHATS[0], {"role": "assistant", "content": "return"}]  # the reply goes on from the text given
    went_on = _chat(client, messages=begun, continue_final_message=True, max_tokens=6, temperature=0)
    text, ids = chat_run.chat_prompt(begun, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nreturn") and went_on["usage"]["prompt_tokens"] == len(ids)
    expected = next(chat_run.stream_samples(text, SampleConfig(greedy=True, max_new_tokens=6), prompt_ids=ids))
    assert went_on["choices"][0]["message"]["content"] == "".join(expected)
    parts = [{"role": "user", "content": [{"type": "text", "text": "def alpha"}, {"type": "text", "text": "(beta):"}]}]
    assert _chat(client, messages=parts, max_tokens=6, temperature=0)["choices"][0]["message"]["content"] == \
        chat_run.chat([{"role": "user", "content": "def alpha\n(beta):"}], greedy=True, max_new_tokens=6)


def test_streamed_chat_deltas_join_to_the_reply(client, chat_run):
    body = {"messages": CHATS[1], "max_tokens": 8, "temperature": 0.9, "seed": 3, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] > 0
    chunks = events[:-2]
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    for i in range(2):
        mine = [e["choices"][0] for e in chunks if e["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] in ("stop", "length")
        text = "".join(c["delta"].get("content", "") for c in mine)
        assert text == chat_run.chat(CHATS[1], temperature=0.9, seed=3 + i, max_new_tokens=8)
    whole = _chat(client, **{**body, "stream": False, "stream_options": None})
    assert [c["message"]["content"] for c in whole["choices"]] == [
        chat_run.chat(CHATS[1], temperature=0.9, seed=3 + i, max_new_tokens=8) for i in range(2)]


def test_chat_logprobs_are_the_completions_scores_of_the_reply(client, chat_run):
    out = _chat(client, messages=CHATS[1], max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)["choices"][0]
    ids = encode_rendered(chat_run.tokenizer, render_chat(CHATML, CHATS[1], chat_run.tokenizer))
    ref = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 2})
    scored = ref.json()["choices"][0]
    assert out["message"]["content"] == scored["text"]
    content = out["logprobs"]["content"]
    assert [c["token"] for c in content] == scored["logprobs"]["tokens"]
    assert [c["logprob"] for c in content] == scored["logprobs"]["token_logprobs"]
    tops = [{t["token"]: t["logprob"] for t in c["top_logprobs"]} for c in content]
    assert tops == scored["logprobs"]["top_logprobs"]
    assert all(c["bytes"] == list(c["token"].encode()) for c in content)
    plain = _chat(client, messages=CHATS[1], max_tokens=3, temperature=0, logprobs=True)["choices"][0]["logprobs"]
    assert all(c["top_logprobs"] == [] for c in plain["content"]) and len(plain["content"]) == 3


@pytest.mark.parametrize("body, param, message", [
    ({"tools": [{"type": "function"}]}, None, None),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "never shows it tools"),
    ({"functions": [{"name": "f"}]}, "functions", "functions is not supported"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({"logprobs": True, "stream": True}, "stream", "leave stream out"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, None, None),
    ({"messages": []}, "messages", None),
    ({"messages": [{"role": "user", "content": "a", "tool_call": []}]}, None, None),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "refusal": "no"}]}, None,
     None),  # an SDK-dumped reply's refusal is taken empty only
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages", "not a JSON object's text"),
])
def test_chat_requests_it_cannot_answer_are_refused(client, body, param, message):
    r = client.post("/v1/chat/completions", json={"messages": CHATS[0], **body})
    assert r.status_code == 400
    error = r.json()["error"]
    if param is not None:
        assert error["param"] == param
    if message is not None:
        assert message in error["message"]


def test_a_run_without_a_template_says_so_and_serve_can_give_it_one(chat_run, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from transformer_lm.serve import create_app

    base = load_run(chat_run.path, "cpu")
    base.chat_template = None
    r = TestClient(create_app(base)).post("/v1/chat/completions", json={"messages": CHATS[0]})
    assert r.status_code == 400 and "has no chat template" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "messages"
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for %}")
    assert main(["serve", str(chat_run.path), "--chat_template", str(broken), "--port", "1"]) == 2
    assert "broken.jinja" in capsys.readouterr().err


def test_openais_client_chats(client, chat_run):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    reply = chat_run.chat(CHATS[1], greedy=True, max_new_tokens=8)
    out = api.chat.completions.create(model="chat", messages=CHATS[1], max_tokens=8, temperature=0)
    assert out.choices[0].message.content == reply and out.choices[0].message.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in api.chat.completions.create(
        model="chat", messages=CHATS[1], max_tokens=8, temperature=0, stream=True)]
    assert "".join(pieces) == reply


def test_tlm_chat_keeps_the_conversation(chat_run, monkeypatch, capsys, tmp_path):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("def alpha(beta):\n\nx = [1, 2]\n/reset\nx = [1, 2]\n"))
    assert main(["chat", str(chat_run.path), "--system", "Be brief.", "--temperature", "0.8", "--seed", "5",
                 "--max_new_tokens", "6"]) == 0
    out = capsys.readouterr().out
    system = [{"role": "system", "content": "Be brief."}]
    chat = [*system, {"role": "user", "content": "def alpha(beta):"}]
    first = chat_run.chat(chat, temperature=0.8, seed=5, max_new_tokens=6)
    chat += [{"role": "assistant", "content": first}, {"role": "user", "content": "x = [1, 2]"}]
    second = chat_run.chat(chat, temperature=0.8, seed=6, max_new_tokens=6)  # the blank line is no turn
    third = chat_run.chat([*system, {"role": "user", "content": "x = [1, 2]"}], temperature=0.8, seed=7,
                          max_new_tokens=6)  # after /reset: the conversation from its system message
    assert out == f"{first}\n{second}\n{third}\n"
    base = tmp_path / "base"
    base.mkdir()
    for f in chat_run.path.iterdir():
        if f.name != CHAT_TEMPLATE_FILE:
            (base / f.name).symlink_to(f)
    assert main(["chat", str(base)]) == 2
    assert "has no chat template" in capsys.readouterr().err
    template = tmp_path / "t.jinja"
    template.write_text(LLAMA3)
    monkeypatch.setattr("sys.stdin", io.StringIO("alpha\n"))
    assert main(["chat", str(base), "--chat_template", str(template), "--greedy", "true",
                 "--max_new_tokens", "4"]) == 0
    run = load_run(base, "cpu")
    run.chat_template = LLAMA3
    assert capsys.readouterr().out == run.chat([{"role": "user", "content": "alpha"}], greedy=True,
                                               max_new_tokens=4) + "\n"


def test_convert_downloads_a_hub_model_id(chat_folder, tmp_path, monkeypatch, capsys):
    """`tlm convert ORG/NAME` fetches the repository's configs, weights, tokenizer and template through
    huggingface_hub (replaced here: nothing is downloaded), then imports the folder as any other."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    asked = []

    def snapshot_download(repo_id, allow_patterns=None, **kw):
        asked.append((repo_id, allow_patterns))
        if repo_id != "org/chat-model":
            raise OSError(f"Repository Not Found for url: https://huggingface.co/api/models/{repo_id}")
        return str(chat_folder[2])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert main(["convert", "org/chat-model", "--out", str(tmp_path / "run")]) == 0
    assert asked == [("org/chat-model", ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"])]
    assert "with its chat template; try `tlm chat" in capsys.readouterr().out
    assert load_run(tmp_path / "run", "cpu").chat_template == CHATML
    assert main(["convert", "org/missing", "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "downloading it from the Hugging Face Hub failed" in err and "Not Found" in err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "missing").mkdir()  # a folder here of that name is read, not downloaded
    assert main(["convert", "org/missing", "--out", str(tmp_path / "other")]) == 2
    assert "is not a Hugging Face model folder" in capsys.readouterr().err and len(asked) == 2


def test_a_turn_taking_server_chats_alike(chat_run):
    """With --draft (speculative decoding: requests take turns on the model), a chat gets the same greedy reply."""
    from fastapi.testclient import TestClient

    from transformer_lm.serve import create_app

    turns = TestClient(create_app(load_run(chat_run.path, "cpu").use_draft(chat_run)))
    out = _chat(turns, messages=CHATS[1], max_tokens=8, temperature=0)["choices"][0]
    assert out["message"]["content"] == chat_run.chat(CHATS[1], greedy=True, max_new_tokens=8)
