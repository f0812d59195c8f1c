"""`tlm serve`: a loaded run behind an HTTP API that speaks OpenAI's completions protocol, so that the `openai`
client, curl, or any tool made for an OpenAI-compatible server (vLLM's, llama.cpp's) can sample from it.

    POST /v1/completions   continue a prompt (text or token ids, or a list of them): max_tokens, temperature,
                           top_p, top_k, stop, n, seed, stream (server-sent events ending in `data: [DONE]`),
                           stream_options.include_usage, echo, logprobs (not streamed; with echo and max_tokens 0
                           or 1, a text's score)
    POST /v1/chat/completions
                           a chat model's reply to `messages`, rendered in its chat template (chat.py; the run
                           folder's, from `tlm convert`, or `--chat_template`): the same sampling fields,
                           max_completion_tokens, logprobs + top_logprobs (not streamed), stream (`delta` events),
                           tools + tool_choice "auto"/"none" + parallel_tool_calls: the tools shown the model by
                           its template, its calls read back from its reply (tool_calls.py) as `tool_calls`;
                           continue_final_message (vLLM's): go on from the last message's text
    GET  /v1/models        the one model served
    GET  /health           liveness, with the run, its checkpoint step and the batch's load

One process serves one model. A Transformer's samples are batched continuously (batching.py): up to `concurrency` of
them, from any requests (a request's n samples too), share every decode step, each in a row of one KV cache; more
wait in arrival order for a row. A model that cannot be batched so (a recurrent one; speculative decoding with a
draft) runs up to `concurrency` requests that take turns on it one token at a time, each with its own KV cache
(decode.lent_cache): a long generation delays a short one by a step per token instead of by its whole length.
A base language model has no chat template: its /v1/chat/completions answers 400, saying so.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any, NamedTuple

import anyio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from .api import Run, seeded_generator
from .batching import DEFAULT_PREFILL_CHUNK, Batcher, Tokens
from .config import SampleConfig
from .decode import DecodeStats
from .errors import ChatError, ConfigError, TLMError
from .evaluate import token_logprobs
from .generate import STREAM_CONTEXT, bos_kept, check_prompt, sample_prompt, text_pieces
from .model import Transformer
from .serve_requests import BadRequest, ChatRequest, CompletionRequest, SamplingRequest
from .tokenizers import Tokenizer
from .tool_calls import ToolCallStream, openai_tool_calls, parse_tool_calls, short_call_ids, tool_call_style

log = logging.getLogger(__name__)


class _Tools(NamedTuple):
    """A chat request's tools: the format the model writes calls in (tool_calls.py), and whether it may make more
    than one a reply (OpenAI's parallel_tool_calls)."""

    style: str
    names: frozenset[str]
    """The functions offered: a call of another is the reply's text."""
    parallel: bool
    short_ids: bool
    """Mistral's templates: call ids of 9 letters and digits (tool_calls.short_call_ids)."""


def _error(message: str, param: str | None = None, status: int = 400) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


class _Turns:
    """A lock handed over in arrival order. threading.Lock is not: a generation that releases it and asks again at
    once, as each one does after every token, takes it back before a waiting one wakes, so a long generation held
    the model for its whole length (a 10-token request waited out a 300-token one)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._waiting: collections.deque[threading.Event] = collections.deque()
        self._held = False

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        with self._guard:
            mine = threading.Event() if self._held else None
            if mine is not None:
                self._waiting.append(mine)
            self._held = True
        if mine is not None:
            mine.wait()  # set by the holder as it hands the turn over, still held
        try:
            yield
        finally:
            with self._guard:
                if self._waiting:
                    self._waiting.popleft().set()
                else:
                    self._held = False


@dataclasses.dataclass
class _Prompt:
    """A request's prompt: its text, the ids a sample continues (generate.sample_prompt's, or the ids given), how
    many of the last of those are the prompt's own (not a BOS or the end-of-text an empty prompt starts from), and
    how many of the first stay first through window shifts (sample_prompt's `keep`)."""

    text: str
    ids: list[int]
    own: int
    keep: int = 0


@dataclasses.dataclass
class _Sample:
    index: int
    prompt: int
    pieces: Iterator[str]
    stats: DecodeStats
    drawn: list[int] | None = None
    """The ids drawn, as the pieces are read (batched samples only)."""


def batches(run: Run) -> bool:
    """Whether `run` is served by continuous batching: a Transformer decoding without a draft (see the module
    docstring)."""
    return isinstance(run.model, Transformer) and run.draft is None


class Server:
    """The state the endpoints share: the run, the sampling defaults, and the batcher or the turn-taking (see the
    module docstring)."""

    def __init__(self, run: Run, defaults: SampleConfig, name: str, concurrency: int,
                 context: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        self.run, self.name = run, name
        self.defaults = run.sample_config(defaults)  # compile turned off where it cannot apply, said once, now
        self.batcher = None
        if batches(run):
            self.batcher = Batcher(run.model, concurrency, self.defaults.compile, context, prefill_chunk)
        self.turns = _Turns()
        self.slots = threading.BoundedSemaphore(concurrency) if self.batcher is None else contextlib.nullcontext()

    def samples(self, prompts: list[_Prompt], cfg: SampleConfig) -> Generator[_Sample, None, None]:
        """Each prompt's cfg.num_samples samples in OpenAI's order (index = prompt * n + sample), sample i seeded
        with seed + i (unseeded: at random): one sample per prompt draws what `tlm sample --seed` draws. Batched, all
        of them are queued at once and generate side by side; taking turns, one after another."""
        seeds = [None if cfg.seed is None else cfg.seed + s for s in range(cfg.num_samples)]
        if self.batcher is None:
            for p, prompt in enumerate(prompts):
                stats = DecodeStats()
                for s, seed in enumerate(seeds):
                    streams = self.run.stream_samples(prompt.text, dataclasses.replace(cfg, seed=seed,
                                                                                       num_samples=1), stats,
                                                      prompt.ids)
                    yield _Sample(p * cfg.num_samples + s, p, self._in_turn(streams), stats)
            return
        queued: list[tuple[int, _Prompt, Tokens, DecodeStats]] = []
        try:
            for p, prompt in enumerate(prompts):
                for seed in seeds:
                    stats, gen = DecodeStats(), seeded_generator(seed, self.run.model)
                    tokens = self.batcher.submit(prompt.ids, cfg.max_new_tokens, cfg.draw_temperature, cfg.top_k,
                                                 cfg.top_p, gen, stats, self.run.tokenizer.vocab_size, prompt.keep,
                                                 self.run.tokenizer.stop_ids)
                    queued.append((p, prompt, tokens, stats))
            for index, (p, prompt, tokens, stats) in enumerate(queued):
                drawn: list[int] = []
                yield _Sample(index, p, self._batched(prompt, tokens, cfg, stats, drawn), stats, drawn)
        finally:
            for *_, tokens, _ in queued:  # a client gone: its samples not yet read give their rows up too
                tokens.close()

    def _batched(self, prompt: _Prompt, tokens: Tokens, cfg: SampleConfig, stats: DecodeStats,
                 drawn: list[int]) -> Iterator[str]:
        def recorded() -> Iterator[int]:
            for tok in tokens:
                drawn.append(tok)
                yield tok

        with tokens:  # a sample ended by a stop string gives its row up now
            yield from text_pieces(self.run.tokenizer, prompt.text, prompt.ids, recorded(), cfg.stop, stats)

    def _in_turn(self, streams: Iterator[Iterator[str]]) -> Iterator[str]:
        with self.turns.turn():
            pieces = next(streams)
        try:
            while True:
                with self.turns.turn():  # one forward (or a prefill) of this generation, then another's turn
                    piece = next(pieces, None)
                if piece is None:
                    return
                yield piece
        finally:
            # Closing hands the cache back (lent_cache) and takes no turn: one taken here deadlocked when the garbage
            # collector closed an abandoned generation during another's forward, in the thread holding the turn.
            pieces.close()

    def _check_model(self, body: SamplingRequest) -> None:
        if body.model is not None and body.model != self.name:
            raise BadRequest(f"the model {body.model!r} is not served here; this server serves {self.name!r}",
                              "model", 404)

    def check_chat(self, body: ChatRequest) -> tuple[list[_Prompt], SampleConfig, _Tools | None]:
        """The chat's prompt (its messages, and the tools it may call, in the run's chat template), sampling settings
        and how to read tool calls back (None without tools), or BadRequest before anything is generated."""
        self._check_model(body)
        schemas, tools = body.tool_schemas(), None
        if schemas is not None:
            style = tool_call_style(self.run.chat_template)
            if style is None:
                raise BadRequest("the model's chat template never shows it tools (it was not tuned to call them); "
                                 "leave tools out, or serve it with a template that renders them (--chat_template)",
                                 "tools")
            tools = _Tools(style, frozenset(t["function"]["name"] for t in schemas),
                           body.parallel_tool_calls is not False, short_call_ids(self.run.chat_template))
        try:
            cfg = body.sample_config(self.defaults)
            text, ids = self.run.chat_prompt([m.as_dict() for m in body.messages], schemas,
                                             body.continue_final_message)
        except ChatError as e:
            raise BadRequest(" ".join(str(e).split()), "messages") from None
        except TLMError as e:  # sampling settings SampleConfig refuses
            raise BadRequest(" ".join(str(e).split())) from None
        return [_Prompt(text, ids, len(ids), bos_kept(self.run.tokenizer, ids))], cfg, tools

    def check(self, body: CompletionRequest) -> tuple[list[_Prompt], SampleConfig]:
        """The request's prompts and sampling settings, or BadRequest before anything is generated."""
        self._check_model(body)
        tokenizer = self.run.tokenizer
        prompts = []
        try:
            cfg = body.sample_config(self.defaults)
            for given in body.prompts():
                if isinstance(given, str):
                    ids, keep = sample_prompt(tokenizer, given)  # text it cannot encode: the client's error
                    prompts.append(_Prompt(given, ids, len(ids) - keep if given else 0, keep))
                    continue
                check_prompt(given, min(tokenizer.vocab_size, self.run.model.config.vocab_size))
                prompts.append(_Prompt(tokenizer.decode(given), list(given), len(given)))
        except (TLMError, ValueError) as e:
            raise BadRequest(" ".join(str(e).split()), "prompt" if isinstance(e, ValueError) else None) from None
        return prompts, cfg

    def complete(self, prompts: list[_Prompt], cfg: SampleConfig, echo: bool = False,
                 logprobs: int | None = None, chat: bool = False, tools: _Tools | None = None) -> dict[str, Any]:
        """The whole response: a completion's (or with `chat` a chat completion's) choices and usage; with `tools`,
        a reply that calls them has its calls as tool_calls, finish_reason "tool_calls"."""
        head = _head(chat)
        if logprobs is not None:
            self._check_scorable(prompts, cfg.max_new_tokens)
        choices, usage = [], _Usage()
        with self.slots, contextlib.closing(self.samples(prompts, cfg)) as samples:
            for sample in samples:
                with contextlib.closing(sample.pieces) as pieces:
                    text = "".join(pieces)
                usage.add(sample)
                prompt = prompts[sample.prompt]
                scored = None if logprobs is None else self._logprobs(prompt, text, logprobs, echo, sample.drawn)
                finish = sample.stats.finish_reason
                if chat:
                    message: dict[str, Any] = {"role": "assistant", "content": text}
                    content, calls = (None, []) if tools is None else parse_tool_calls(text, tools.style, tools.names)
                    if calls:
                        message = {**message, "content": content,
                                   "tool_calls": openai_tool_calls(calls, tools.parallel, tools.short_ids)}
                        finish = "tool_calls"
                    choices.append({"index": sample.index, "message": message,
                                    "logprobs": None if scored is None else _chat_logprobs(scored),
                                    "finish_reason": finish})
                else:
                    choices.append({"text": prompt.text + text if echo else text, "index": sample.index,
                                    "logprobs": scored, "finish_reason": finish})
        return {**head, "model": self.name, "choices": choices, "usage": usage.as_dict()}

    def _check_scorable(self, prompts: list[_Prompt], max_tokens: int) -> None:
        """BadRequest, before anything is generated, where a prompt and its completion could not be scored in one
        forward (logprobs)."""
        if not isinstance(self.run.model, Transformer):
            return  # a recurrent model has no window
        block = self.run.model.config.block_size
        for p, prompt in enumerate(prompts):
            if len(prompt.ids) + max_tokens > block:
                raise BadRequest(f"with logprobs, prompt {p} and max_tokens must fit the context window of {block} "
                                  "tokens; give a shorter prompt or fewer max_tokens", "prompt")

    def _logprobs(self, prompt: _Prompt, text: str, top: int, echo: bool,
                  drawn: list[int] | None) -> dict[str, list[Any]]:
        """OpenAI's logprobs of the completion `text` after `prompt` (and of the prompt's own tokens first, with
        echo; the first token of all has None unless a BOS precedes it): of the ids `drawn` for it (less a stop id,
        and any whose text a stop string cut off), or where those are not kept (a server taking turns) of `text`
        encoded as a continuation."""
        tokenizer = self.run.tokenizer
        ids = prompt.ids
        start = len(ids) - prompt.own if echo else len(ids)
        if drawn is None:
            new = tokenizer.encode_continuation(text) if text else []
        else:
            new = [tok for tok in drawn if tok not in tokenizer.stop_ids]
            while new and len(tokenizer.decode(new)) > len(text):
                new.pop()
        with self.turns.turn() if self.batcher is None else contextlib.nullcontext():  # beside the batch's thread
            scored = token_logprobs(self.run.model, ids + new, top, tokenizer.vocab_size)
        return _openai_logprobs(tokenizer, ids + new, start, scored)

    def events(self, prompts: list[_Prompt], cfg: SampleConfig, include_usage: bool,
               echo: bool = False, chat: bool = False, tools: _Tools | None = None) -> Generator[str, None, None]:
        """The response as server-sent events: each sample's text pieces as they come (chat: as `delta`s of the
        assistant's message, the first naming its role), then its finish_reason, then (include_usage) the usage.
        With `tools`, text that may begin a tool call is held back (tool_calls.ToolCallStream) and the calls come
        whole, in one delta, before finish_reason "tool_calls"."""
        head = {**_head(chat, stream=True), "model": self.name}
        usage = _Usage()

        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

        def choice(index: int, text: str | None, finish: str | None = None) -> dict[str, Any]:
            if not chat:
                return {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

        with self.slots, contextlib.closing(self.samples(prompts, cfg)) as samples:
            for sample in samples:
                if chat:
                    yield event([{**choice(sample.index, ""), "delta": {"role": "assistant", "content": ""}}])
                elif echo and prompts[sample.prompt].text:
                    yield event([choice(sample.index, prompts[sample.prompt].text)])
                split = None if tools is None else ToolCallStream(tools.style, tools.names)
                with contextlib.closing(sample.pieces) as pieces:  # a client gone: the generation ends now
                    for piece in pieces:
                        if piece := piece if split is None else split.feed(piece):
                            yield event([choice(sample.index, piece)])
                usage.add(sample)
                finish = sample.stats.finish_reason
                if split is not None:
                    rest, calls = split.finish()
                    if rest:
                        yield event([choice(sample.index, rest)])
                    if calls:
                        made = openai_tool_calls(calls, tools.parallel, tools.short_ids)
                        deltas = [{"index": i, **call} for i, call in enumerate(made)]
                        yield event([{**choice(sample.index, None), "delta": {"tool_calls": deltas}}])
                        finish = "tool_calls"
                yield event([choice(sample.index, None, finish)])
        if include_usage:
            yield event([], usage=usage.as_dict())
        yield "data: [DONE]\n\n"


@dataclasses.dataclass
class _Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _prompts_seen: set[int] = dataclasses.field(default_factory=set)

    def add(self, sample: _Sample) -> None:
        """Count a finished sample's new tokens, and its prompt's tokens once per prompt (as OpenAI does for n > 1)."""
        self.completion_tokens += sample.stats.new_tokens
        if sample.prompt not in self._prompts_seen:
            self._prompts_seen.add(sample.prompt)
            self.prompt_tokens += sample.stats.prompt_tokens

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _openai_logprobs(tokenizer: Tokenizer, ids: list[int], start: int,
                     scored: list[tuple[float, list[tuple[int, float]]]]) -> dict[str, list[Any]]:
    """OpenAI's logprobs object for ids[start:] (the completion's, or with echo the prompt's own and the
    completion's), `scored` holding token_logprobs of ids[1:]. Each token's text is what it adds after the ids
    before it (as streaming decodes), so that a SentencePiece token keeps its space; its offset is the length of the
    texts before it from ids[start] on: an offset into the choice's text."""
    def piece(context: list[int], i: int) -> str:
        lead = tokenizer.decode(context)
        text = tokenizer.decode([*context, i])
        return text[len(lead):] if text.startswith(lead) else tokenizer.decode([i])

    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for i in range(start, len(ids)):
        context = ids[max(0, i - STREAM_CONTEXT):i]
        token = piece(context, ids[i])
        out["tokens"].append(token)
        out["text_offset"].append(offset)
        offset += len(token)
        if i == 0:  # nothing before the first: no probability
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        chosen, top = scored[i - 1]
        out["token_logprobs"].append(chosen)
        out["top_logprobs"].append({piece(context, t): lp for t, lp in top})
    return out


def _chat_logprobs(scored: dict[str, list[Any]]) -> dict[str, list[dict[str, Any]]]:
    """A completion's logprobs (_openai_logprobs) in the chat completions' shape: one entry per token, with its
    UTF-8 bytes, and its top_logprobs a list of such entries."""
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top.items()]}
                        for token, logprob, top in zip(scored["tokens"], scored["token_logprobs"],
                                                       scored["top_logprobs"])]}


def _head(chat: bool = False, stream: bool = False) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
            "created": int(time.time())}


class _EventStream(StreamingResponse):
    """Server-sent events from a generator that is closed however the response ends. Starlette leaves the iterator
    of a client that went away suspended, its generation holding a slot (and its KV cache) until the garbage
    collector finds it."""

    def __init__(self, events: Generator[str, None, None]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.events = events

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A cancelled response still waits for its generation to end. At a forced shutdown (a second Ctrl-C) the
            # generator may still be running in a worker thread ("generator already executing"): serve() then ends
            # the batch, which ends it.
            with anyio.CancelScope(shield=True), contextlib.suppress(ValueError):
                await anyio.to_thread.run_sync(self.events.close)


def create_app(run: Run, defaults: SampleConfig | None = None, name: str | None = None,
               concurrency: int = 8, context: int | None = None,
               prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> FastAPI:
    """The ASGI app serving `run` (uvicorn runs it; fastapi.testclient.TestClient calls it in-process). `defaults`
    are the sampling settings of requests that leave them out; `name` is the model id clients give (default: the run
    folder's name); `concurrency` the samples generating at once (batching.Batcher's rows: see the module
    docstring); `context` (the positions each row holds) and `prefill_chunk` are batching.Batcher's."""
    if concurrency < 1:
        raise TLMError(f"concurrency must be >= 1, got {concurrency}")
    server = Server(run, defaults or SampleConfig(), name or run.path.resolve().name, concurrency, context,
                    prefill_chunk)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if server.batcher is not None:  # shutting down: the batch's generations end before the process does
            await anyio.to_thread.run_sync(server.batcher.close)

    app = FastAPI(title="transformer-lm", summary=f"{server.name}: OpenAI-compatible text completions",
                  lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Any, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first["type"] == "json_invalid" or first["loc"] == ("body",):  # not JSON, or not an object, or none
            return _error("the request body must be a JSON object of the completion's fields, sent with "
                          "Content-Type: application/json")
        where = ".".join(str(p) for p in first["loc"][1:])
        return _error(f"{where}: {first['msg']}", where)

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Any, exc: BadRequest) -> JSONResponse:
        return _error(str(exc), exc.param, exc.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        state = {"status": "ok", "model": server.name, "run": str(run.path), "step": run.step}
        if server.batcher is not None:
            state["batch"] = server.batcher.load()
        return state

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": 0,
                                            "owned_by": "transformer-lm"}]}

    @app.post("/v1/completions", response_model=None)
    def completions(body: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        prompts, cfg = server.check(body)
        if body.stream:
            return _EventStream(server.events(prompts, cfg, body.include_usage(), body.echo))
        return server.complete(prompts, cfg, body.echo, body.logprobs)

    @app.post("/v1/chat/completions", response_model=None)
    def chat_completions(body: ChatRequest) -> dict[str, Any] | StreamingResponse:
        prompts, cfg, tools = server.check_chat(body)
        if body.stream:
            return _EventStream(server.events(prompts, cfg, body.include_usage(), chat=True, tools=tools))
        return server.complete(prompts, cfg, logprobs=body.scored(), chat=True, tools=tools)

    return app


def check_address(host: str, port: int) -> None:
    """Raise ConfigError now, before a model is loaded (and compiled), when `host`:`port` cannot be listened on."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be 1-65535, got {port}")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:  # create_server adds "(while attempting to bind on address ...)": the address is said here
        why = (e.strerror or str(e)).split(" (while")[0]
        raise ConfigError(f"cannot listen on {host}:{port} ({why}); choose another --port (or --host), or stop what "
                          "holds it") from None


GRACE_S = 5
"""Seconds a Ctrl-C gives the responses under way to finish before they are cut off (uvicorn would wait for them
however long they take)."""


def serve(run: Run, defaults: SampleConfig, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
          concurrency: int = 8, context: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
    """Serve `run` with uvicorn until interrupted. A batching server runs the batch in this (the main) thread and
    uvicorn in another (batching.Batcher.drive says why); Ctrl-C (or SIGTERM) gives the responses under way GRACE_S
    seconds, a second one ends them at once. With compile, the decode step for the shortest cache length
    (generate.cache_len) is compiled here, before the first client waits on it; longer ones compile on first use."""
    import uvicorn

    app = create_app(run, defaults, name, concurrency, context, prefill_chunk)
    server: Server = app.state.server
    if server.defaults.compile:
        log.info("compiling the decode step before serving")
        prompts, _ = server.check(CompletionRequest(prompt=""))
        server.complete(prompts, dataclasses.replace(server.defaults, max_new_tokens=2, num_samples=1, stop=[]))
    base = f"http://{'localhost' if host in ('127.0.0.1', '0.0.0.0', '::') else host}:{port}/v1"
    log.info("serving %s as model %r: POST %s/completions%s (openai.OpenAI(base_url=%r, api_key='unused'))",
             run.path, server.name, base, " and /chat/completions" if run.chat_template is not None else
             " (no chat template: no /chat/completions)", base)
    http = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                         timeout_graceful_shutdown=GRACE_S))
    if server.batcher is None:
        http.run()
        return
    batcher = server.batcher

    def serve_http() -> None:  # off the main thread, uvicorn leaves the signals to us
        try:
            http.run()
        except SystemExit:  # uvicorn's way out of a failed start, after logging why: serve() raises below
            pass
        finally:
            batcher.close()  # however uvicorn ends (a forced exit skips the lifespan's end), drive() returns

    def stop(_signum: int, _frame: object) -> None:  # only flags: it may run in the middle of a batch step
        if http.should_exit:
            http.force_exit = True
        else:
            log.info("shutting down: the responses under way get %d s (Ctrl-C again to end them now)", GRACE_S)
            http.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    web = threading.Thread(target=serve_http, name="tlm-http")
    web.start()
    try:
        batcher.drive()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        batcher.close()
        web.join()
    if not http.started:  # uvicorn said why (an address taken since check_address, say) and gave up
        raise TLMError(f"the server did not start on {host}:{port}: see uvicorn's error above")
