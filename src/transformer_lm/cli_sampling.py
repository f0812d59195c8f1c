"""The options of the `tlm` commands that sample from a run (`tlm sample`, `tlm chat`, `tlm serve`), how they load
it, and `tlm chat` and `tlm serve` themselves (serve.py behind uvicorn)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from jsonargparse import ArgumentParser, Namespace

from .batching import DEFAULT_CONTEXT, DEFAULT_PREFILL_CHUNK
from .cli_args import config_from
from .config import SampleConfig
from .errors import ChatError, ConfigError

if TYPE_CHECKING:
    from .api import Run

QUANTIZE_HELP = ("Quantization applied after loading: int8 (weight-only, the LM head included), int4 or "
                 "int4:GROUP_SIZE (weight-only, default group 128), or w8a8 (int8 weights and per-call int8 "
                 "activations on fbgemm's CPU kernels: the fastest on a CPU, a little less exact).")


def sampling_parser(description: str) -> ArgumentParser:
    """The run, how it is loaded, and SampleConfig's fields."""
    p = ArgumentParser(exit_on_error=False, description=description)
    p.add_argument("run", type=str, help="Run folder.")
    p.add_class_arguments(SampleConfig, nested_key=None, instantiate=False)
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:N or mps.")
    p.add_argument("--quantize", type=str | None, default=None, help=QUANTIZE_HELP)
    p.add_argument("--draft", type=str | None, default=None,
                   help="Run folder of a smaller model with the same tokenizer: speculative decoding (same output "
                   "distribution, fewer target forwards).")
    p.add_argument("--draft_k", type=int, default=4, help="Tokens the draft proposes per target forward.")
    return p


def load_for_sampling(a: Namespace, decode_layout: bool = True) -> Run:
    """The run of a sampling command, quantized, with its draft, as the options say, and in the decode layout
    (layout.py) unless told otherwise."""
    from .api import load_run
    from .quantize import parse_quantize

    run = load_run(a.run, a.device)
    if a.quantize:
        run.quantize(**parse_quantize(a.quantize))
    if decode_layout:
        run.use_decode_layout()
    if a.draft:
        run.use_draft(load_run(a.draft, a.device).use_decode_layout(), a.draft_k)
    return run


def read_template_file(path: str) -> str:
    """A chat template file's text, checked to compile (ChatError naming the line, ConfigError for no such file)."""
    from .chat import check_template

    try:
        return check_template(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the chat template {path} ({e}); give a Jinja template file") from None
    except ChatError as e:
        raise ChatError(f"{path}: {e}") from None


CHAT_TEMPLATE_HELP = ("A Jinja chat template file (the format of transformers' chat_template.jinja), in place of the "
                      "run's own (which `tlm convert` keeps from a chat model's folder).")


def add_chat_parser(cmds: dict[str, ArgumentParser]) -> None:
    p = cmds["chat"] = sampling_parser("Chat with a chat model (an imported instruction-tuned one, or any run given "
                                       "--chat_template): each line read is your turn, the reply streams after it; "
                                       "a line /reset starts over.")
    p.add_argument("--system", type=str | None, default=None, help="A system message to start the conversation.")
    p.add_argument("--chat_template", type=str | None, default=None, help=CHAT_TEMPLATE_HELP)


def cmd_chat(a: Namespace) -> None:
    """A conversation on the terminal (or over a pipe: each line of standard input one turn), kept whole: each
    reply is generated from the whole conversation so far in the run's chat template, ending at its end-of-turn
    token. Reply i is seeded with --seed + i, so a seeded conversation repeats. A line "/reset" starts the
    conversation over (from the system message)."""
    import dataclasses
    import sys

    template = read_template_file(a.chat_template) if a.chat_template else None
    cfg = config_from(SampleConfig, a)
    if cfg.num_samples != 1:
        raise ConfigError("tlm chat writes one reply per turn; leave --num_samples out")
    run = load_for_sampling(a)
    if template is not None:
        run.chat_template = template
    start = [{"role": "system", "content": a.system}] if a.system else []
    run.chat_prompt([*start, {"role": "user", "content": ""}])  # no template, or one refusing this: say so now
    cfg = run.sample_config(cfg)
    tty = sys.stdin.isatty()
    if tty:
        print(f"chatting with {run.path} (/reset starts over, Ctrl-D ends)", file=sys.stderr)
    messages, turn = list(start), 0
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        if line.strip() == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        text, ids = run.chat_prompt(messages)
        seed = None if cfg.seed is None else cfg.seed + turn
        reply = []
        for piece in next(run.stream_samples(text, dataclasses.replace(cfg, seed=seed), prompt_ids=ids)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        turn += 1


def add_serve_parser(cmds: dict[str, ArgumentParser]) -> None:
    p = cmds["serve"] = sampling_parser("Serve a run over HTTP with OpenAI's completions API (POST "
                                        "/v1/completions); the sampling options are the defaults of requests.")
    p.add_argument("--host", type=str, default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface).")
    p.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    p.add_argument("--name", type=str | None, default=None, help="Model id clients give (default: the run folder's "
                   "name).")
    p.add_argument("--concurrency", type=int, default=8, help="Samples generating at once, batched: each a row of "
                   "one KV cache, all sharing every decode step; more wait for a row. (With --draft, or a recurrent "
                   "model: requests taking turns on the model token by token.)")
    p.add_argument("--context", type=int | None, default=None, help="Positions each row of the batch's KV cache "
                   f"holds (default: the model's context window, at most {DEFAULT_CONTEXT}); a longer sample shifts "
                   "its window there, keeping the last half. Memory: concurrency × context positions of keys and "
                   "values.")
    p.add_argument("--chat_template", type=str | None, default=None,
                   help=f"For POST /v1/chat/completions: {CHAT_TEMPLATE_HELP[0].lower()}{CHAT_TEMPLATE_HELP[1:]}")
    p.add_argument("--prefill_chunk", type=int, default=DEFAULT_PREFILL_CHUNK, help="Prompt tokens prefilled "
                   "per decode step while other samples generate: smaller keeps their tokens coming more evenly, "
                   "larger prefills faster.")


def cmd_serve(a: Namespace) -> None:
    try:
        import uvicorn  # noqa: F401 - serve() imports it

        from .serve import batches, check_address, serve
    except ImportError as e:
        raise ConfigError(f"tlm serve needs FastAPI and uvicorn ({e}): pip install fastapi uvicorn, or the project's "
                          "extra: pip install -e '.[serve]'") from None
    if a.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {a.concurrency}")
    if a.context is not None and a.context < 2:
        raise ConfigError(f"--context must be at least 2 positions, got {a.context}")
    if a.prefill_chunk < 1:
        raise ConfigError(f"--prefill_chunk must be at least 1, got {a.prefill_chunk}")
    template = read_template_file(a.chat_template) if a.chat_template else None
    check_address(a.host, a.port)
    run = load_for_sampling(a, decode_layout=False)
    if template is not None:
        run.chat_template = template
    if not batches(run):  # the decode layout speeds one row up and slows a few down (layout.py)
        run.use_decode_layout()
    serve(run, config_from(SampleConfig, a), a.host, a.port, a.name, a.concurrency, a.context, a.prefill_chunk)
