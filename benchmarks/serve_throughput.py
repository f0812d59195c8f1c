"""What serving costs and what batching gains: tokens/s of `tlm serve` over HTTP (its own process, on localhost,
streamed, as clients read them) against the same tokens generated in this process, one client and several at once.

    python benchmarks/serve_throughput.py RUN [--clients 1 4] [--tokens 64] [--repeats 3] [--threads N]
                                              [--quantize int8|int4|w8a8]

Every request is greedy `--tokens` tokens after the same prompt (no stop id reached: a run folder trained briefly
rarely writes one; the counts come from `usage`). Two references, in this process: one by one (Run.generate, one
sample after another, in the decode layout as `tlm sample` runs it: what N clients get when they take turns on the
model, as the server did before it batched) and batched (generate.generate_batch of the N prompts at once, in
nn.Linear's layout as the server runs: what its continuous batching can reach at most). Rounds alternate the
references and the served calls (`repeats` rounds, median reported) so that a busy machine slows all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import torch

from transformer_lm.api import load_run
from transformer_lm.generate import generate_batch, sample_prompt
from transformer_lm.quantize import parse_quantize

PROMPT = "The "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(url: str, clients: int, tokens: int) -> tuple[float, float]:
    """(aggregate tokens/s, median seconds to the first streamed text) of `clients` concurrent streamed requests."""
    counts, firsts = [0] * clients, [0.0] * clients
    start = threading.Barrier(clients + 1)

    def ask(i: int) -> None:
        body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.Client(timeout=None) as http:
            start.wait()
            t0 = time.perf_counter()
            with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if not firsts[i] and event["choices"] and event["choices"][0]["text"]:
                        firsts[i] = time.perf_counter() - t0
                    if event.get("usage"):
                        counts[i] = event["usage"]["completion_tokens"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0), statistics.median(firsts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quantize", default=None, help="as tlm serve's --quantize, for the server and both references")
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    run, plain = load_run(args.run), load_run(args.run)
    if args.quantize:
        run.quantize(**parse_quantize(args.quantize))
        plain.quantize(**parse_quantize(args.quantize))
    run.use_decode_layout()  # as `tlm sample` runs it: the decode layout, fastest at one row; `plain` as `tlm serve`
    # batches it: nn.Linear, faster at a few rows (layout.py)
    port = free_port()
    # the server in a process of its own, as clients meet it: not sharing this one's interpreter lock
    server = subprocess.Popen([sys.executable, "-m", "transformer_lm.cli", "serve", args.run, "--port", str(port),
                               "--concurrency", str(max(args.clients)),
                               *(["--quantize", args.quantize] if args.quantize else [])],
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            httpx.get(f"{url}/health")
            break
        except httpx.TransportError:
            if server.poll() is not None:
                sys.exit(f"tlm serve {args.run} exited with {server.returncode}")
            time.sleep(0.2)
    served(url, 1, 4)  # warm-up: first-request costs (imports, the model's kept cache) outside the clock

    def one_by_one(clients: int) -> float:
        t0 = time.perf_counter()
        texts = run.generate(PROMPT, greedy=True, max_new_tokens=args.tokens, num_samples=clients)
        assert len(texts if clients > 1 else [texts]) == clients
        return clients * args.tokens / (time.perf_counter() - t0)

    ids = sample_prompt(run.tokenizer, PROMPT)[0]

    def batched(clients: int) -> float:
        t0 = time.perf_counter()
        generate_batch(plain.model, [ids] * clients, args.tokens)
        return clients * args.tokens / (time.perf_counter() - t0)

    print(f"{args.run}{' ' + args.quantize if args.quantize else ''}: {args.tokens} greedy tokens after {PROMPT!r}, "
          f"{torch.get_num_threads()} threads, "
          f"median of {args.repeats} rounds; tokens/s of all clients together")
    print(f"{'clients':>7} {'one by one':>10} {'batched':>8} {'served':>8} {'served/one by one':>17} "
          f"{'served/batched':>14} {'first text s':>12}")
    for clients in args.clients:
        rounds = [(one_by_one(clients), batched(clients), *served(url, clients, args.tokens))
                  for _ in range(args.repeats)]
        o, b, s, first = (statistics.median(r[i] for r in rounds) for i in range(4))
        print(f"{clients:>7} {o:>10.1f} {b:>8.1f} {s:>8.1f} {s / o:>16.2f}x {s / b:>13.2f}x {first:>12.3f}")
    server.terminate()


if __name__ == "__main__":
    main()
