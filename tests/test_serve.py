"""`tlm serve`: OpenAI's completions protocol over a run, called in-process with FastAPI's TestClient. The reference
for every text is the library's own sampling of the same run (Run.generate, itself tested against transformers'
models), and for the protocol OpenAI's published shapes: choices in prompt-major order, usage counting a prompt
once for n samples, server-sent events ending in `data: [DONE]`, errors as {"error": {"message", "param", ...}}."""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import socket
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest
import torch

from conftest import make_corpus, random_model
from transformer_lm import runtime
from transformer_lm.api import Run, load_run
from transformer_lm.checkpoint import save_checkpoint
from transformer_lm.cli import main
from transformer_lm.config import ModelConfig, SampleConfig, dump_json
from transformer_lm.errors import ConfigError, TLMError
from transformer_lm.generate import generate
from transformer_lm.tokenizers import BPETokenizer, ByteTokenizer, save_tokenizer

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from transformer_lm.serve import CompletionRequest, _Turns, create_app  # noqa: E402

PROMPT = "def alpha_1(beta):\n"


def _write(folder: Path, tokenizer: BPETokenizer, model: torch.nn.Module) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(dump_json({"model": model.config.to_dict()}))
    save_tokenizer(tokenizer, folder / "tokenizer.json")
    save_checkpoint(folder, model, {}, 1)
    return folder


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return BPETokenizer.train(make_corpus(), vocab_size=320)


@pytest.fixture(scope="module")
def config(tokenizer: BPETokenizer) -> ModelConfig:
    return ModelConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32,
                       tie_embeddings=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tokenizer: BPETokenizer, config: ModelConfig) -> Run:
    """Large random weights: greedy samples that run to max_tokens and differ from prompt to prompt."""
    return load_run(_write(tmp_path_factory.mktemp("serve") / "tiny", tokenizer, random_model(config)), "cpu")


@pytest.fixture(scope="module")
def eot_run(tmp_path_factory: pytest.TempPathFactory, tokenizer: BPETokenizer, config: ModelConfig) -> Run:
    """A model whose greedy sample of PROMPT ends at end-of-text: that id's LM head row is a scaled copy of the row
    of the 4th token it draws without one, as tests/test_stop_ids.py makes an imported model stop."""
    model = random_model(config, seed=1)
    free = list(generate(model, tokenizer.encode(PROMPT), 8, temperature=0.0))
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eot_id] = model.lm_head.weight[free[3]] * 1.5
    return load_run(_write(tmp_path_factory.mktemp("serve") / "eot", tokenizer, model), "cpu")


@pytest.fixture(scope="module")
def client(run: Run) -> TestClient:
    return TestClient(create_app(run, SampleConfig(max_new_tokens=12), concurrency=4))


def complete(client: TestClient, **body: object) -> dict:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(client: TestClient, **body: object) -> list[dict | str]:
    """The events of a streamed completion: each `data:` payload parsed, the final [DONE] kept as the string."""
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in lines]


def test_greedy_completion_is_the_libraries_sample(client: TestClient, run: Run) -> None:
    out = complete(client, prompt=PROMPT, max_tokens=10, temperature=0)
    expected = run.generate(PROMPT, greedy=True, max_new_tokens=10)
    assert out["object"] == "text_completion" and out["model"] == "tiny" and out["id"].startswith("cmpl-")
    assert out["choices"] == [{"text": expected, "index": 0, "logprobs": None, "finish_reason": "length"}]
    prompt_tokens = len(run.tokenizer.encode(PROMPT))
    assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 10, "total_tokens": prompt_tokens + 10}


def test_server_defaults_fill_what_a_request_leaves_out(run: Run) -> None:
    served = TestClient(create_app(run, SampleConfig(max_new_tokens=5, greedy=True)))
    out = complete(served, prompt=PROMPT)
    assert out["choices"][0]["text"] == run.generate(PROMPT, greedy=True, max_new_tokens=5)
    assert out["usage"]["completion_tokens"] == 5
    # a request's temperature wins over the server's greedy: seeded samples, sample i as the library draws it
    # with seed + i
    out = complete(served, prompt=PROMPT, temperature=1.0, seed=3, n=2)
    assert [c["text"] for c in out["choices"]] == [run.generate(PROMPT, temperature=1.0, seed=3 + i,
                                                                max_new_tokens=5) for i in range(2)]


def test_prompts_and_n_in_openais_order_with_usage(client: TestClient, run: Run) -> None:
    prompts = [PROMPT, "x = [beta"]
    out = complete(client, prompt=prompts, n=2, max_tokens=6, temperature=0.9, top_k=20, seed=7)
    texts = [[run.generate(p, temperature=0.9, top_k=20, seed=7 + i, max_new_tokens=6) for i in range(2)]
             for p in prompts]  # sample i seeded with seed + i
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]  # prompt-major: index = prompt * n + sample
    assert [c["text"] for c in out["choices"]] == [*texts[0], *texts[1]]
    assert out["choices"][0]["text"] != out["choices"][1]["text"]  # two draws, not one repeated
    prompt_tokens = sum(len(run.tokenizer.encode(p)) for p in prompts)  # each prompt once, whatever n
    assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 24, "total_tokens": prompt_tokens + 24}
    assert complete(client, prompt=prompts, n=2, max_tokens=6, temperature=0.9, top_k=20, seed=7)["choices"] == \
        out["choices"]  # a seed reproduces the whole response


def test_stream_joins_to_the_completion_and_ends_with_done(client: TestClient) -> None:
    body = {"prompt": [PROMPT, "class Gamma:"], "max_tokens": 9, "temperature": 0}
    whole = complete(client, **body)
    events = stream(client, **body, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    chunks = events[:-2]
    assert len({e["id"] for e in chunks}) == 1 and all(e["object"] == "text_completion" for e in chunks)
    for choice in whole["choices"]:
        mine = [e["choices"][0] for e in chunks if e["choices"][0]["index"] == choice["index"]]
        assert len(mine) > 2  # streamed piece by piece, not sent whole
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + ["length"]  # the last chunk says why
    assert "usage" not in stream(client, **body)[-2]  # usage only when asked for


def test_speculative_decoding_serves_the_same_greedy_text_and_counts(run: Run) -> None:
    """With a draft (here the model itself, so every proposal is accepted: several tokens per target forward), the
    text, the finish reason and the token counts are plain decoding's."""
    speculative = load_run(run.path, "cpu").use_draft(load_run(run.path, "cpu"), 3)
    served, plain = TestClient(create_app(speculative)), TestClient(create_app(run))
    free = run.generate(PROMPT, greedy=True, max_new_tokens=12)
    for ask in ({"max_tokens": 10}, {"max_tokens": 12, "stop": free[6:8]}):
        out, ref = (complete(c, prompt=PROMPT, temperature=0, **ask) for c in (served, plain))
        assert (out["choices"], out["usage"]) == (ref["choices"], ref["usage"])


def test_stop_strings_and_end_of_text_finish_with_stop(client: TestClient, run: Run, eot_run: Run) -> None:
    free = run.generate(PROMPT, greedy=True, max_new_tokens=12)
    stop = free[5:7]
    out = complete(client, prompt=PROMPT, temperature=0, stop=[stop, "never written"])
    assert out["choices"][0]["text"] == free[:free.index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"
    streamed = stream(client, prompt=PROMPT, temperature=0, stop=stop)
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == free[:free.index(stop)]
    assert streamed[-2]["choices"][0]["finish_reason"] == "stop"

    ids = run.tokenizer.encode(PROMPT)
    expected = list(generate(eot_run.model, ids, 12, temperature=0.0, stop_ids=eot_run.tokenizer.stop_ids))
    assert expected[-1] == eot_run.tokenizer.eot_id and len(expected) < 12  # the fixture does end at end-of-text
    out = complete(TestClient(create_app(eot_run)), prompt=PROMPT, max_tokens=12, temperature=0)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["text"] == eot_run.tokenizer.decode(expected[:-1])
    assert out["usage"]["completion_tokens"] == len(expected)  # the end-of-text drawn counts, as OpenAI's does


def test_concurrent_requests_take_turns_and_match_one_by_one(client: TestClient, run: Run) -> None:
    prompts = [PROMPT, "x = [beta", "class Gamma:", "    return total"]
    alone = [complete(client, prompt=p, max_tokens=12, temperature=0)["choices"][0]["text"] for p in prompts]
    results: dict[int, str] = {}
    start = threading.Barrier(len(prompts))

    def ask(i: int) -> None:
        start.wait()
        results[i] = "".join(e["choices"][0]["text"] for e in stream(client, prompt=prompts[i], max_tokens=12,
                                                                       temperature=0)[:-1])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == alone


def test_a_short_request_is_not_held_up_by_a_long_one(run: Run) -> None:
    """Generations take turns token by token in arrival order: a 4-token request that arrives while a 400-token one
    runs ends first (with threading.Lock's unfair handover it waited for the whole long one)."""
    big = ModelConfig(vocab_size=256, block_size=512, n_layer=4, n_head=4, n_embd=128)  # forwards of ~1 ms
    server = create_app(Run(run.path, {}, random_model(big), ByteTokenizer(), 0)).state.server
    started, turns = threading.Event(), []
    prompts, _ = server.check(CompletionRequest(prompt=PROMPT))

    def generate_(name: str, tokens: int) -> None:
        for sample in server.samples(prompts, SampleConfig(max_new_tokens=tokens, greedy=True)):
            for _ in sample.pieces:
                turns.append(name)
                started.set()

    long = threading.Thread(target=generate_, args=("long", 400))
    long.start()
    started.wait()
    generate_("short", 4)
    long.join()
    during = turns[turns.index("short"):len(turns) - turns[::-1].index("short")]
    assert during.count("long") <= during.count("short") + 1 and turns[-1] == "long"


@pytest.mark.parametrize("batched", [True, False])
def test_a_client_that_goes_away_ends_its_generation(run: Run, batched: bool) -> None:
    """Under uvicorn (ASGI 2.3) starlette learns of a client gone from a disconnect message and cancels the response;
    the generation must end then and free its row or slot (here the only one) at once, not whenever the garbage
    collector (disabled here) gets to it: with StreamingResponse alone it did not. With a draft the server takes
    turns instead of batching."""
    app = create_app(run if batched else load_run(run.path, "cpu").use_draft(run), concurrency=1)
    server = app.state.server
    body = json.dumps({"prompt": PROMPT, "max_tokens": 10**6, "stream": True}).encode()
    sent: list[dict] = []

    received = []

    async def receive() -> dict:
        received.append(1)
        if len(received) == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        while len(sent) < 4:
            await anyio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    gc.disable()
    try:
        with contextlib.suppress(Exception):  # starlette's ClientDisconnect
            anyio.run(app, scope, receive, send)
        assert len(sent) < 200  # it stopped when the client went, not after 10**6 tokens
        if batched:
            batcher = server.batcher
            deadline = time.monotonic() + 5
            while batcher.thread is not None and time.monotonic() < deadline:  # its row is freed at the next step
                time.sleep(0.01)
            assert batcher.rows == [None] and not batcher.waiting and batcher.thread is None
        else:
            assert server.batcher is None and server.slots.acquire(blocking=False)  # the slot is free again
            server.slots.release()
            assert not server.turns._held
    finally:
        gc.enable()


def test_shutting_down_ends_the_batch_first(run: Run) -> None:
    """The app's lifespan ends the batch's generations and waits for its thread: a process that exits while that
    thread is inside a forward dies of std::terminate (seen at Ctrl-C of a busy server)."""
    app = create_app(run, concurrency=2)
    batcher = app.state.server.batcher
    with TestClient(app):
        endless = batcher.submit([1, 2], 10**9, temperature=1.0)
        next(endless)
    assert batcher.thread is None and len(list(endless)) < 10**3


def test_turns_are_handed_over_in_arrival_order() -> None:
    """The holder that asks again right after its turn queues behind those already waiting (threading.Lock lets it
    take the turn back first, as a generation does after each token)."""
    turns, order = _Turns(), []

    def wait_then(name: str) -> None:
        with turns.turn():
            order.append(name)

    with turns.turn():
        threads = []
        for name in ("a", "b"):
            threads.append(threading.Thread(target=wait_then, args=(name,)))
            threads[-1].start()
            while len(turns._waiting) < len(threads):  # queued in this order
                time.sleep(0.001)
    wait_then("again")
    for t in threads:
        t.join()
    assert order == ["a", "b", "again"]


@pytest.mark.parametrize(("body", "status", "param", "says"), [
    ({"prompt": "a", "max_token": 5}, 400, "max_token", "Extra inputs are not permitted"),
    ({"prompt": "a", "logprobs": 2, "stream": True}, 400, "stream", "leave stream out"),
    ({"prompt": "a", "logprobs": 21, "echo": True, "max_tokens": 0}, 400, "logprobs", "less than or equal to 20"),
    ({"prompt": "a" * 200, "logprobs": 1, "echo": True, "max_tokens": 0}, 400, "prompt",
     "with logprobs, prompt 0 and max_tokens must fit the context window of 64 tokens"),
    ({"prompt": ["a", "b"], "logprobs": 1, "max_tokens": 64}, 400, "prompt", "prompt 0 and max_tokens must fit"),
    ({"prompt": "a", "suffix": "b"}, 400, "suffix", "suffix is not supported"),
    ({"prompt": "a", "temperature": -1}, 400, None, "temperature must be >= 0"),
    ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0"),
    ({"prompt": "a", "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"prompt": "a", "top_p": 0}, 400, None, "top_p"),
    ({"prompt": []}, 400, "prompt", "prompt is an empty list"),
    ({"prompt": [1, 320]}, 400, "prompt", "prompt id 320 is outside"),
    ({"prompt": [[1, 2], "a"]}, 400, "prompt", "Input should be a valid"),
    ({"prompt": [[1, 2], []]}, 400, "prompt", "prompt is an empty list"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model", "'gpt-4' is not served here; this server serves 'tiny'"),
])
def test_bad_requests_are_refused_by_name(client: TestClient, body: dict, status: int, param: str | None,
                                          says: str) -> None:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert says in error["message"] and "\n" not in error["message"]
    if param is not None:
        assert error["param"].split(".")[0] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("request_", [{"content": b"{not json", "headers": {"content-type": "application/json"}},
                                      {"content": b"[1, 2]", "headers": {"content-type": "application/json"}},
                                      {"data": {"prompt": "a"}}, {}])
def test_a_body_that_is_no_json_object_is_refused(client: TestClient, request_: dict) -> None:
    r = client.post("/v1/completions", **request_)
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("the request body must be a JSON object")


def test_echo_puts_the_prompt_before_each_completion(client: TestClient, run: Run) -> None:
    body = {"prompt": [PROMPT, "x = "], "max_tokens": 6, "temperature": 0, "echo": True, "n": 2}
    texts = [p + run.generate(p, greedy=True, max_new_tokens=6) for p in body["prompt"] for _ in range(2)]
    assert [c["text"] for c in complete(client, **body)["choices"]] == texts
    events = [json.loads(line[6:]) for line in client.post("/v1/completions", json={**body, "stream": True}).text
              .splitlines() if line.startswith("data: {")]
    streamed = ["".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i) for i in range(4)]
    assert streamed == texts
    assert complete(client, prompt=PROMPT, max_tokens=0, echo=True)["choices"][0]["text"] == PROMPT


def test_scoring_a_prompt_gives_each_tokens_logprob_as_a_naive_loop_does(client: TestClient, run: Run) -> None:
    """echo + max_tokens 0 + logprobs, as evaluation harnesses score texts: token i's log-probability given the ones
    before it, and the k likeliest there, against one forward per prefix of the plain model."""
    ids = run.tokenizer.encode(PROMPT)
    out = complete(client, prompt=PROMPT, echo=True, max_tokens=0, logprobs=3, n=2)
    assert [c["index"] for c in out["choices"]] == [0, 1] and out["choices"][0] == {**out["choices"][1], "index": 0}
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == PROMPT and "".join(lp["tokens"]) == PROMPT and len(lp["tokens"]) == len(ids)
    assert lp["text_offset"] == [len(run.tokenizer.decode(ids[:i])) for i in range(len(ids))]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        for i in range(1, len(ids)):
            ref = run.model(torch.tensor([ids[:i]])).logits[0, -1, :run.tokenizer.vocab_size].log_softmax(-1)
            assert lp["token_logprobs"][i] == pytest.approx(float(ref[ids[i]]), abs=1e-4)
            top = ref.topk(3)
            assert list(lp["top_logprobs"][i].values()) == pytest.approx(top.values.tolist(), abs=1e-4)
            assert list(lp["top_logprobs"][i]) == [run.tokenizer.decode([t]) for t in top.indices.tolist()]
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    turns = TestClient(create_app(load_run(run.path, "cpu").use_draft(run)))  # a server taking turns scores alike
    assert complete(turns, prompt=PROMPT, echo=True, max_tokens=0, logprobs=3, n=2)["choices"] == out["choices"]


def test_scoring_after_a_bos_gives_the_first_token_its_logprob(run: Run) -> None:
    """A tokenizer with a BOS (Llama's, llama2.c's) puts it before the prompt: the prompt's first token is then
    predicted, and the BOS itself is not among the tokens returned."""
    class WithBos(type(run.tokenizer)):
        bos_id = run.tokenizer.eot_id

    tokenizer = copy.copy(run.tokenizer)
    tokenizer.__class__ = WithBos
    served = TestClient(create_app(Run(run.path, {}, run.model, tokenizer, 0)))
    lp = complete(served, prompt=PROMPT, echo=True, max_tokens=0, logprobs=1)["choices"][0]["logprobs"]
    ids = [tokenizer.bos_id, *run.tokenizer.encode(PROMPT)]
    assert "".join(lp["tokens"]) == PROMPT and len(lp["tokens"]) == len(ids) - 1
    with torch.no_grad():
        ref = run.model(torch.tensor([ids])).logits[0, :-1, :tokenizer.vocab_size].log_softmax(-1)
    assert lp["token_logprobs"] == pytest.approx(ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist(),
                                                 abs=1e-4)


def test_a_completions_logprobs_follow_its_tokens_and_extend_the_prompts(client: TestClient, run: Run) -> None:
    """logprobs of a greedy completion: its 8 tokens, each the likeliest at its place; with echo and max_tokens 1
    (how lm-evaluation-harness scores) the prompt's part is the max_tokens 0 scoring's."""
    out = complete(client, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1)["choices"][0]
    lp = out["logprobs"]
    assert out["text"] == run.generate(PROMPT, greedy=True, max_new_tokens=8) and len(lp["tokens"]) == 8
    assert lp["text_offset"][0] == 0 and None not in lp["token_logprobs"]
    cut = complete(client, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1, stop=[out["text"][4:6]])
    assert len(cut["choices"][0]["logprobs"]["tokens"]) < 8  # the tokens a stop string cut off are left out
    assert [list(t.values())[0] for t in lp["top_logprobs"]] == pytest.approx(lp["token_logprobs"], abs=1e-5)
    prompt_only = complete(client, prompt=PROMPT, echo=True, max_tokens=0, logprobs=1)["choices"][0]["logprobs"]
    one_more = complete(client, prompt=PROMPT, echo=True, max_tokens=1, temperature=0, logprobs=1)["choices"][0]
    n = len(prompt_only["tokens"])
    assert {k: v[:n] for k, v in one_more["logprobs"].items()} == prompt_only
    assert len(one_more["logprobs"]["tokens"]) == n + 1


def test_token_id_prompts_are_served_as_their_text_is(client: TestClient, run: Run) -> None:
    """Evaluation harnesses send their tokenizer's ids: the same completions and scores as for the text they encode."""
    ids = run.tokenizer.encode(PROMPT)
    body = {"max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 2}
    by_text, by_ids = complete(client, prompt=PROMPT, **body), complete(client, prompt=ids, **body)
    assert by_ids["choices"] == by_text["choices"] and by_ids["usage"] == by_text["usage"]
    several = complete(client, prompt=[ids, ids[:3]], max_tokens=4, temperature=0)["choices"]
    assert [c["text"] for c in several] == [run.generate(run.tokenizer.decode(p), greedy=True, max_new_tokens=4)
                                           for p in (ids, ids[:3])]
    turns = TestClient(create_app(load_run(run.path, "cpu").use_draft(run)))  # speculative: taking turns
    assert complete(turns, prompt=ids[:3], max_tokens=4, temperature=0)["choices"][0]["text"] == several[1]["text"]


def test_models_and_health(client: TestClient, run: Run) -> None:
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]
    assert client.get("/health").json() == {"status": "ok", "model": "tiny", "run": str(run.path), "step": run.step,
                                            "batch": {"rows": 4, "running": 0, "waiting": 0}}
    named = TestClient(create_app(run, name="my-model"))
    assert complete(named, prompt="a", model="my-model", max_tokens=1)["model"] == "my-model"


def test_cli_serve_refuses_bad_settings_before_listening(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(run.path), "--concurrency", "0"]) == 2
    assert "--concurrency must be at least 1" in capsys.readouterr().err
    assert main(["serve", str(run.path), "--temperature", "-1"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", str(run.path), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", str(run.path), "--port", "70000"]) == 2
    assert "--port must be 1-65535, got 70000" in capsys.readouterr().err
    assert main(["serve", str(run.path), "--context", "1"]) == 2
    assert "--context must be at least 2 positions, got 1" in capsys.readouterr().err
    assert main(["serve", str(run.path), "--prefill_chunk", "0"]) == 2
    assert "--prefill_chunk must be at least 1, got 0" in capsys.readouterr().err


def test_a_batch_cache_too_large_for_memory_names_the_options(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "free_memory", lambda device: 10_000)  # bytes: less than 8 rows × 64 positions need
    with pytest.raises(ConfigError, match=r"the batch's KV cache \(8 rows × 64 positions\) needs .*--concurrency.*"
                                          r"--context"):
        create_app(run, concurrency=8)


def test_serve_that_cannot_listen_fails_instead_of_exiting_quietly(run: Run) -> None:
    """An address taken between check_address and uvicorn's bind: uvicorn gives up in its thread, and serve() must
    say so (it returned as after a clean shutdown, exit 0)."""
    from transformer_lm.serve import serve

    with socket.create_server(("127.0.0.1", 0)) as taken:
        with pytest.raises(TLMError, match="did not start on 127.0.0.1"):
            serve(run, SampleConfig(), port=taken.getsockname()[1], concurrency=1)


@pytest.mark.parametrize("missing", ["uvicorn", "transformer_lm.serve"])  # the latter: as without fastapi
def test_cli_serve_without_its_packages_says_what_to_install(run: Run, missing: str, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # what an import of a package not installed raises: ImportError
    assert main(["serve", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert "tlm serve needs FastAPI and uvicorn" in err and "pip install fastapi uvicorn" in err
    assert len(err.strip().splitlines()) == 1


def test_openais_own_client_reads_the_responses(client: TestClient, run: Run) -> None:
    """The `openai` package, pointed at the app, parses completions, streams, the model list and errors."""
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    expected = run.generate(PROMPT, greedy=True, max_new_tokens=7)
    done = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=7, temperature=0)
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 7
    events = list(api.completions.create(model="tiny", prompt=PROMPT, max_tokens=7, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(e.choices[0].text for e in events if e.choices) == expected
    assert events[-1].usage.total_tokens == done.usage.total_tokens
    assert [m.id for m in api.models.list()] == ["tiny"]
    with pytest.raises(openai.BadRequestError, match="leave stream out"):
        api.completions.create(model="tiny", prompt=PROMPT, logprobs=2, stream=True)
    scored = api.completions.create(model="tiny", prompt=PROMPT, echo=True, max_tokens=0, logprobs=2)
    assert scored.choices[0].text == PROMPT and "".join(scored.choices[0].logprobs.tokens) == PROMPT
    assert scored.choices[0].logprobs.token_logprobs[0] is None and len(scored.choices[0].logprobs.top_logprobs[1]) == 2
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        api.completions.create(model="gpt-4", prompt=PROMPT)
