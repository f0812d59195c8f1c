"""Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding").

A small draft model proposes k tokens one at a time; the target model scores all of them in one forward pass of k+1
positions, and a rejection rule keeps a prefix of the proposals plus one token of its own. The output has exactly the
target model's distribution (greedy: exactly its greedy tokens) whatever the draft; a good draft only makes it faster.
Both models keep a KV cache; rejected positions are dropped by moving `cache.pos` back (what lies beyond `pos` is
never attended to and is overwritten by the next write).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

import torch
from torch import nn

from .config import check_sampling
from .decode import activation_dtype
from .errors import ConfigError
from .generate import check_prompt, crop_prompt, next_token_probs, until_stop
from .model import Transformer


def check_draft(target: Transformer, draft: Transformer, vocab_size: int | None = None) -> None:
    """Raise ConfigError unless `draft` can propose tokens for `target`: both embedding tables cover the
    `vocab_size` ids drawn (tables padded differently for one tokenizer are fine, e.g. Qwen2-0.5B's 151,936 rows
    drafting for Qwen2-7B's 152,064), or without `vocab_size`, the tables are the same size. The tokenizers themselves
    are compared by the caller, which has them."""
    sizes = draft.config.vocab_size, target.config.vocab_size
    if (min(sizes) < vocab_size) if vocab_size is not None else sizes[0] != sizes[1]:
        raise ConfigError(f"the draft model's vocabulary ({sizes[0]}) does not match the target's ({sizes[1]}"
                          f"{'' if vocab_size is None else f', tokenizer {vocab_size}'}); use a draft trained with "
                          "the same tokenizer")


class _Window:
    """One model's context during speculative decoding: its cache holds seq[:keep] + seq[start:] of the ids so far
    (all of them while start is 0), within that model's own context window. Target and draft keep one each, so that a
    draft with a shorter context than the target's never shortens what the target sees (which would change its
    distribution); the draft's window only affects how well it guesses."""

    def __init__(self, model: nn.Module, needed: int, keep: int) -> None:
        block = model.config.block_size
        self.cache = model.make_cache(1, max_len=min(block, needed), dtype=activation_dtype(model))
        self.limit = self.cache.max_len  # positions the cache holds (no more than the block)
        self.half = max(1, block // 2)
        self.keep = min(keep, self.half - 1)
        self.start = 0

    def view(self, seq: list[int]) -> list[int]:
        return seq[:self.keep] + seq[self.start:] if self.start else seq

    def make_room(self, ids: list[int], extra: int) -> int:
        """Restart from the recent half window (the cache emptied, to be refilled from the view) when the view of
        `ids` and `extra` more positions would overflow the cache; -> the view's length of `ids`."""
        n = len(self.view(ids))
        if n + extra > self.limit and n > self.half:
            self.start, self.cache.pos = len(ids) - (self.half - self.keep), 0
            n = self.half
        return n


@torch.no_grad()
def speculative_generate(target: Transformer, draft: Transformer, prompt: Sequence[int], max_new_tokens: int,
                         k: int = 4, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         generator: torch.Generator | None = None, vocab_size: int | None = None,
                         keep: int = 0, stop_ids: Collection[int] = ()) -> Iterator[int]:
    """Yield up to `max_new_tokens` ids continuing `prompt`, distributed as `generate(target, ...)` would draw them
    (temperature 0: the same greedy ids). `k` is the number of draft proposals per target forward; `vocab_size`
    limits the ids drawn, the prompt's first `keep` ids stay at the window's start, and the output ends after the
    first of `stop_ids`, as in generate().

    While prompt + output fit in the target's context window the greedy ids equal generate()'s (except with a w8a8
    target, whose activation scale is the whole call's: quantize.py), whatever the draft's window; past its own
    window, each model restarts from the last half of it (as generate() does with a Transformer, though not at the
    same token, and never with a recurrent model, whose state it carries on: so long greedy outputs may differ).
    """
    check_prompt(prompt, min(target.config.vocab_size, draft.config.vocab_size))
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    if k < 1:
        raise ConfigError(f"speculative decoding needs k >= 1 draft tokens per step, got {k}")
    check_draft(target, draft, vocab_size)
    modes = target.training, draft.training
    target.eval(), draft.eval()
    device = target.tok_emb.weight.device
    ids = crop_prompt(prompt, target.config.block_size, keep)
    tw, dw = (_Window(m, len(ids) + max_new_tokens + k, keep) for m in (target, draft))
    tcache, dcache = tw.cache, dw.cache
    greedy = temperature == 0

    def probs(logits: torch.Tensor) -> torch.Tensor:
        return next_token_probs(logits, temperature, top_k, top_p)

    def draw(p: torch.Tensor) -> int:
        return int(torch.multinomial(p, 1, generator=generator))

    produced = 0
    try:
        while produced < max_new_tokens:
            k_round = min(k, max_new_tokens - produced - 1)  # the round adds up to k_round + 1 tokens
            n = tw.make_room(ids, k_round)  # the target writes n + k_round positions
            k_round = min(k_round, tw.limit - n)
            nd = dw.make_room(ids, k_round - 1)  # the draft reads all but its last proposal
            k_round = min(k_round, dw.limit - nd + 1)

            # 1. the draft proposes k_round tokens, one forward each
            drafted: list[int] = []
            qs: list[torch.Tensor] = []
            for _ in range(k_round):
                seq = dw.view(ids + drafted)
                x = torch.tensor([seq[dcache.pos:]], device=device)
                logits = draft(x, cache=dcache, last_only=True).logits[0, -1, :vocab_size]
                if greedy:
                    drafted.append(int(logits.argmax()))
                else:
                    qs.append(probs(logits))
                    drafted.append(draw(qs[-1]))

            # 2. the target scores the pending ids and all proposals in one forward: k_round + 1 distributions
            seq = tw.view(ids + drafted)
            x = torch.tensor([seq[tcache.pos:]], device=device)
            logits = target(x, cache=tcache).logits[0, -(k_round + 1):, :vocab_size]  # (k_round + 1, V)

            # 3. keep proposals while they pass; the first failure is replaced by a draw from the residual
            new: list[int] = []
            for i, tok in enumerate(drafted):
                if greedy:
                    best = int(logits[i].argmax())
                    new.append(best)
                    if best != tok:
                        break
                    continue
                p, q = probs(logits[i]), qs[i]
                u = float(torch.rand((), generator=generator, device=device))
                if u * float(q[tok]) < float(p[tok]):  # accept with probability min(1, p/q)
                    new.append(tok)
                    continue
                residual = (p - q).clamp(min=0)  # normalized max(0, p - q): what q under-proposes
                new.append(draw(residual / residual.sum() if float(residual.sum()) > 0 else p))
                break
            else:  # every proposal accepted: one more token from the target's last distribution, for free
                new.append(int(logits[-1].argmax()) if greedy else draw(probs(logits[-1])))

            # 4. rewind both caches to the accepted prefix (the last new token is pending, as in generate())
            tcache.pos = n + len(new) - 1
            dcache.pos = min(dcache.pos, nd + len(new) - 1)
            new, stopped = until_stop(new, stop_ids)
            ids.extend(new)
            produced += len(new)
            yield from new
            if stopped:
                return
    finally:
        target.train(modes[0])
        draft.train(modes[1])
