"""Autoregressive generation: prefill the prompt into a KV cache, then decode one token at a time (decode.py holds
the static cache and the steps, optionally compiled).

`generate` works on token ids and yields them as they are drawn; `stream_text` turns those into text pieces for a
terminal, holding back incomplete UTF-8 and possible stop-string prefixes so that what is printed is never taken back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterator, Sequence

import torch
from torch import nn

from .config import SampleConfig, check_sampling
from .decode import DecodeStats, decode_step, lent_cache, prefill
from .model import Transformer
from .perf import now
from .tokenizers import Tokenizer

log = logging.getLogger(__name__)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                vocab_size: int | None = None) -> torch.Tensor:
    """Draw one id per row of `logits` (B, V) -> (B,). temperature 0 is greedy (argmax). With `vocab_size`, only
    ids below it (a tokenizer smaller than the model's padded embedding table: its extra rows are no tokens).

    Drawn with the exponential race (equivalent to the Gumbel-max trick): with E_i ~ Exp(1) independent,
    argmax_i p_i / E_i is i with probability p_i. Unlike torch.multinomial it never waits for the host."""
    logits = logits[..., :vocab_size]
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    # a draw of exactly 0 would turn a filtered-out token (p = 0) into 0/0 = NaN, which argmax picks
    return (probs / race.clamp_(min=torch.finfo(race.dtype).tiny)).argmax(dim=-1)


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> torch.Tensor:
    """The distribution sample_next draws from (temperature > 0): (..., V) logits -> (..., V) float32 probabilities
    after temperature, top-k and top-p filtering. The max is taken out before dividing by the temperature, so that
    a tiny one cannot overflow the logits to inf (and the softmax to NaN): it tends to greedy, as it should."""
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass of the tokens ranked strictly above it already reaches top_p
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(dim=-1)


def compiles(model: nn.Module, compile: bool) -> bool:
    """Whether a decode step of `model` asked to `compile` is compiled: a Transformer's is (its cache position is a
    device tensor). A recurrent model's cache position is a Python int, so its compiled step would be recompiled at
    every position (30 tokens of a small LSTM took 76 s under dynamo's recompile warnings): it decodes eagerly,
    after one warning."""
    if compile and not isinstance(model, Transformer):
        log.warning("compiling applies to the Transformer's decode step; this %s samples eagerly", model.config.arch)
        return False
    return compile


def window(ids: list[int], size: int, keep: int = 0) -> list[int]:
    """The first `keep` ids (a BOS that models trained with one expect first) and the last of the others, `size` in
    all when `ids` is longer (the newest id always kept)."""
    if len(ids) <= size:
        return ids
    keep = min(keep, size - 1)
    return ids[:keep] + ids[len(ids) - (size - keep):]


def until_stop(ids: list[int], stop_ids: Collection[int]) -> tuple[list[int], bool]:
    """`ids` up to and including the first of `stop_ids` (transformers' generate keeps the EOS it stops at too),
    and whether one was there."""
    end = next((i for i, t in enumerate(ids) if t in stop_ids), None)
    return (ids, False) if end is None else (ids[:end + 1], True)


def check_prompt(prompt: Sequence[int], table: int) -> None:
    """Raise ValueError unless `prompt` is non-empty and its ids index the `table` rows of the model's embedding:
    torch's own error, 'index out of range in self', names neither the id nor the table."""
    if len(prompt) == 0:
        raise ValueError("generation needs a non-empty prompt")
    bad = next((t for t in prompt if not 0 <= t < table), None)
    if bad is not None:
        raise ValueError(f"prompt id {bad} is outside the model's embedding table of {table} rows; encode the prompt "
                         "with the model's own tokenizer")


def crop_prompt(ids: Sequence[int], block_size: int, keep: int = 0) -> list[int]:
    """Keep block_size - 1 ids (at least one), leaving room for a new token: the first `keep` and the last."""
    ids = list(ids)
    size = max(1, block_size - 1)
    if len(ids) > size:
        log.warning("prompt of %d tokens leaves no room for a new token in the context window (%d): keeping its "
                    "last %d tokens%s",
                    len(ids), block_size, size - min(keep, size - 1), " after BOS" if keep else "")
        ids = window(ids, size, keep)
    return ids


@torch.no_grad()
def generate(model: Transformer, prompt: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True, compile: bool = False, sync_every: int | None = None,
             stats: DecodeStats | None = None, vocab_size: int | None = None, keep: int = 0,
             stop_ids: Collection[int] = ()) -> Iterator[int]:
    """Yield up to `max_new_tokens` ids continuing `prompt` (a non-empty id list), ending after the first of
    `stop_ids` drawn (a tokenizer's stop_ids; it is yielded, as transformers' generate returns the EOS it stops at).

    With the cache, the prompt is processed once and each step runs the model on the newest token only. When the
    window fills up, the cache is rebuilt from the last half window (amortized cost instead of a full recompute per
    token); the prompt's first `keep` ids (its BOS, for models trained with one) stay at the window's start through
    cropping and rebuilds, as llama.cpp's context shift keeps them. A recurrent model has no window: its whole prompt
    goes in and its state carries on past block_size, never cropped or rebuilt. `use_cache=False` recomputes
    everything every step: the slow reference the cache is tested against. `compile` compiles the decode step
    (decode.py; a Transformer's only: `compiles`). Tokens stay on the device and reach the host `sync_every` at a
    time (default: 1 on CPU, where reading a tensor costs nothing; 8 elsewhere), and are checked for a stop id
    there: a chunk's ids past one are dropped, no extra sync. `stats` receives the timings.
    `vocab_size` limits the ids drawn (sample_next).
    The model keeps its KV cache afterwards for the next generation of the same length (decode.lent_cache;
    decode.release_cache(model) frees it).
    """
    check_prompt(prompt, model.config.vocab_size)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    windowed = isinstance(model, Transformer)  # a recurrent model's state holds all it has read: it has no window
    ids = crop_prompt(prompt, model.config.block_size, keep) if windowed else list(prompt)
    try:
        if use_cache:
            yield from _generate_cached(model, ids, max_new_tokens, temperature, top_k, top_p, generator,
                                        compiles(model, compile), sync_every, stats, vocab_size, keep, stop_ids)
            return
        device = model.tok_emb.weight.device
        for _ in range(max_new_tokens):
            x = torch.tensor([window(ids, model.config.block_size, keep) if windowed else ids], device=device)
            logits = model(x, last_only=True).logits
            ids.append(int(sample_next(logits[:, -1], temperature, top_k, top_p, generator, vocab_size)))
            yield ids[-1]
            if ids[-1] in stop_ids:
                return
    finally:
        model.train(was_training)


def cache_len(needed: int, block: int, compile: bool) -> int:
    """The KV cache's length for a generation writing `needed` positions: no more than that, since imported models
    have contexts of 32K-128K positions, and no more than the block. A compiled step is traced for one cache shape
    (dynamic=False), so with `compile` the length is rounded up to a power of two (at least 64): generations of
    different lengths (a server's requests) share a few compiled steps instead of recompiling for each length."""
    if compile:
        needed = max(64, 1 << max(0, needed - 1).bit_length())
    return min(block, needed)


def _generate_cached(model: Transformer, ids: list[int], max_new_tokens: int, temperature: float,
                     top_k: int | None, top_p: float | None, generator: torch.Generator | None, compile: bool,
                     sync_every: int | None, stats: DecodeStats | None, vocab_size: int | None,
                     keep: int, stop_ids: Collection[int]) -> Iterator[int]:
    device = model.tok_emb.weight.device
    block = model.config.block_size
    sync_every = sync_every or (1 if device.type == "cpu" else 8)
    step = decode_step(compile, device)
    max_len = cache_len(len(ids) + max_new_tokens, block, compile)
    limit = max_len if isinstance(model, Transformer) else None  # a recurrent model's ring of states never fills
    stats = stats if stats is not None else DecodeStats()
    with lent_cache(model, 1, max_len) as cache:
        start = now(device)
        logits = prefill(model, cache, torch.tensor([ids], device=device))
        filled = len(ids)  # the host's count of the cache's position, so that nothing needs to read it back
        stats.prompt_tokens, stats.prefill_s, stats.new_tokens = filled, now(device) - start, 0
        start = time.perf_counter()
        produced = 0
        while produced < max_new_tokens:
            drawn, full = [], False
            while len(drawn) < sync_every and produced + len(drawn) < max_new_tokens:
                drawn.append(sample_next(logits, temperature, top_k, top_p, generator, vocab_size))  # (1,), on device
                if produced + len(drawn) == max_new_tokens:
                    break  # the last token needs no forward
                if filled == limit:
                    full = True  # no slot for the new token: restart, which needs the ids on the host
                    break
                logits = step(model, cache, drawn[-1][:, None], None, None)
                filled += 1
            new, stopped = until_stop(torch.cat(drawn).tolist(), stop_ids)  # the one host sync per chunk
            ids.extend(new)
            produced += len(new)
            stats.new_tokens, stats.decode_s, stats.context = produced, time.perf_counter() - start, filled
            yield from new
            if stopped:
                return
            if full:  # window full: restart from the recent half window, the newest token included
                pending = window(ids, max(1, block // 2), keep)
                cache.reset()
                logits = prefill(model, cache, torch.tensor([pending], device=device))
                filled = len(pending)


STREAM_CONTEXT = 8
"""Prompt ids decoded before the new ones in stream_text: the spacing rules of the tokenizers here look one piece
back; a few more cover byte-fallback characters split over several ids."""

STREAM_SETTLE = 64
"""New ids after which stream_text folds what they decode to into its settled text and decodes on after their last
STREAM_CONTEXT ids, as it does after the prompt's: each token then decodes a bounded stretch, not the whole sample
so far (which made streaming quadratic: an 8000-token char sample took 1.55x the time of its generation)."""


def sample_prompt(tokenizer: Tokenizer, prompt: str) -> tuple[list[int], int]:
    """The ids a sample of `prompt` continues, and how many of them stay first through window shifts (`keep`: 1 for
    a leading BOS). Models trained with BOS expect it first (llama2.c, Llama); an empty prompt starts from
    end-of-text (or the first id when there is none)."""
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    if tokenizer.bos_id is not None and prompt_ids[:1] != [tokenizer.bos_id]:
        prompt_ids = [tokenizer.bos_id, *prompt_ids]
    if not prompt_ids:
        prompt_ids = [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
    return prompt_ids, bos_kept(tokenizer, prompt_ids)


def bos_kept(tokenizer: Tokenizer, ids: list[int]) -> int:
    """generate()'s `keep` for a prompt of `ids`: 1 when it starts with the tokenizer's BOS, which stays first
    through window shifts, else 0."""
    return int(tokenizer.bos_id is not None and ids[:1] == [tokenizer.bos_id])


def stream_text(model: Transformer, tokenizer: Tokenizer, prompt: str, cfg: SampleConfig,
                generator: torch.Generator | None = None, draft: Transformer | None = None,
                draft_k: int = 4, stats: DecodeStats | None = None,
                prompt_ids: list[int] | None = None) -> Iterator[str]:
    """Yield text pieces of one sample continuing `prompt` (text_pieces: up to cfg.stop or a stop id). With a
    `draft` model (same tokenizer), tokens come from speculative decoding with `draft_k` proposals per step: same
    distribution. `stats` receives generate()'s timings (with a draft only the token counts) and the finish_reason.
    `prompt_ids`, when given, are the prompt's ids as they are (a rendered chat's, or a client's), instead of
    sample_prompt's encoding of `prompt` (its decoding); a leading BOS among them stays first through window shifts."""
    if prompt_ids is None:
        prompt_ids, keep = sample_prompt(tokenizer, prompt)
    else:
        prompt_ids, keep = list(prompt_ids), bos_kept(tokenizer, prompt_ids)
    temperature = cfg.draw_temperature
    stats = stats if stats is not None else DecodeStats()
    if draft is None:
        tokens = generate(model, prompt_ids, cfg.max_new_tokens, temperature, cfg.top_k, cfg.top_p, generator,
                          compile=cfg.compile, stats=stats, vocab_size=tokenizer.vocab_size, keep=keep,
                          stop_ids=tokenizer.stop_ids)
    else:
        from .speculative import speculative_generate  # speculative imports this module

        stats.prompt_tokens, stats.new_tokens = len(prompt_ids), 0  # generate() counts its own

        def counted(ids: Iterator[int]) -> Iterator[int]:
            for tok in ids:
                stats.new_tokens += 1
                yield tok

        tokens = counted(speculative_generate(model, draft, prompt_ids, cfg.max_new_tokens, draft_k, temperature,
                                              cfg.top_k, cfg.top_p, generator, tokenizer.vocab_size, keep,
                                              tokenizer.stop_ids))
    yield from text_pieces(tokenizer, prompt, prompt_ids, tokens, cfg.stop, stats)


def text_pieces(tokenizer: Tokenizer, prompt: str, prompt_ids: list[int], tokens: Iterator[int],
                stop: Sequence[str], stats: DecodeStats) -> Iterator[str]:
    """Turn the new ids `tokens` continuing `prompt_ids` (the ids of `prompt`) into text pieces, stopping at any of
    the strings `stop` (excluded) or at any of the tokenizer's stop_ids (its end-of-text id, and the other
    end-of-sequence ids of an imported model); stats.finish_reason says which ended it. Joining the pieces gives the
    sample's full text; incomplete UTF-8 and a tail that may still grow into a stop string are held back, so that
    nothing yielded is ever taken back."""
    # Decode the new ids after the prompt's last ones: SentencePiece-style tokenizers drop a leading space at the
    # start of a text ("▁there" alone is "there") and keep it after BOS only where the piece follows text, so the
    # continuation's text is decode(context + new) less decode(context), as transformers' TextStreamer does.
    context = prompt_ids[-STREAM_CONTEXT:]
    lead = tokenizer.decode(context)

    def decode(ids: list[int]) -> str:
        text = tokenizer.decode(context + ids)
        return text[len(lead):] if text.startswith(lead) else tokenizer.decode(ids)

    new: list[int] = []
    settled, done = 0, ""  # new[:settled] decodes to `done` for good: the context has moved past them
    emitted = 0
    hold = max((len(s) for s in stop), default=1) - 1
    tail = prompt[-hold:] if hold else ""  # the prompt's last characters a stop string may begin in
    stop_ids = tokenizer.stop_ids
    stats.finish_reason = "length"
    for tok in tokens:
        if tok in stop_ids:
            stats.finish_reason = "stop"
            break
        new.append(tok)
        piece = decode(new[settled:])
        text = done + piece
        # searched from the prompt's tail on: a stop string may begin in the prompt ("\n\n" after a prompt ending in
        # "\n"); what of it the sample wrote is left out, as always
        full = tail + text
        start = max(0, len(tail) + emitted - hold)  # and each match ends in the sample (not within the prompt):
        cut = min((i for i in (full.find(s, max(start, len(tail) - len(s) + 1)) for s in stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            stats.finish_reason = "stop"
            yield text[emitted:max(emitted, cut - len(tail))]
            return
        # Hold back a trailing replacement char (a multi-byte character may be half-decoded) and a tail that could
        # still grow into a stop string.
        safe = len(text.rstrip("\ufffd")) - hold
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
        if len(new) - settled >= STREAM_SETTLE and not piece.endswith("\ufffd"):  # no character cut at the end
            settled, done = len(new), text
            context = new[-STREAM_CONTEXT:]
            lead = tokenizer.decode(context)
    text = done + decode(new[settled:])
    if len(text) > emitted:
        yield text[emitted:]


@torch.no_grad()
def generate_batch(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   generator: torch.Generator | None = None, compile: bool = False,
                   vocab_size: int | None = None, stop_ids: Collection[int] = ()) -> list[list[int]]:
    """Continue several prompts of different lengths at once: `max_new_tokens` new ids per prompt (`compile`: the
    decode step compiled, and `vocab_size`, as in generate()). The ids reach the host once, at the end: every row
    runs all the steps, and is then cut after its first of `stop_ids`, as generate() ends there.

    Prompts are left-padded to the longest and prefilled in one forward; each row gets its own positions (counted
    from its first real token) and a key mask hides the padding, so every row sees exactly the positions and context
    that generate() gives it alone, and greedy ids are the same (for a model with float or weight-only quantized
    weights; w8a8's activation scale is the whole call's, so there they may differ: quantize.py). A Transformer's
    prompts and new ids must fit its context window; a recurrent model has none.
    """
    for p in prompts:
        check_prompt(p, model.config.vocab_size)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    lens = [len(p) for p in prompts]
    longest, B = max(lens), len(prompts)
    # the last draw needs no forward; a recurrent model has no window to fit
    if longest + max_new_tokens - 1 > model.config.block_size and isinstance(model, Transformer):
        raise ValueError(f"the longest prompt ({longest} tokens) plus {max_new_tokens} new tokens exceeds the "
                         f"context window of {model.config.block_size}; generate those prompts one by one")
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    pad = torch.tensor([longest - n for n in lens], device=device)  # (B,)
    ids = torch.tensor([[0] * (longest - n) + list(p) for p, n in zip(prompts, lens)], device=device)  # (B, L)
    key_mask = torch.arange(longest + max_new_tokens, device=device)[None, :] >= pad[:, None]  # (B, S), False: pad
    step = decode_step(compiles(model, compile), device)
    positions = (torch.arange(longest, device=device)[None, :] - pad[:, None]).clamp(min=0)  # (B, L)
    out = []
    try:
        with lent_cache(model, B, min(model.config.block_size, longest + max_new_tokens - 1)) as cache:
            logits = prefill(model, cache, ids, positions, key_mask)
            for i in range(max_new_tokens):
                nxt = sample_next(logits, temperature, top_k, top_p, generator, vocab_size)  # (B,)
                out.append(nxt)
                if i + 1 < max_new_tokens:
                    positions = (longest + i - pad)[:, None]  # (B, 1)
                    logits = step(model, cache, nxt[:, None], positions, key_mask)
    finally:
        model.train(was_training)
    return [until_stop(row, stop_ids)[0] for row in torch.stack(out, 1).tolist()]
