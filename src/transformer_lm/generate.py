"""Autoregressive generation: prefill the prompt into a KV cache, then decode one token at a time.

`generate` works on token ids and yields them as they are drawn; `stream_text` turns those into text pieces for a
terminal, holding back incomplete UTF-8 and possible stop-string prefixes so that what is printed is never taken back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch

from .config import SampleConfig
from .model import KVCache, Transformer
from .tokenizers import Tokenizer

log = logging.getLogger(__name__)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one id per row of `logits` (B, V) -> (B,). temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass of the tokens ranked strictly above it already reaches top_p
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def crop_prompt(ids: Sequence[int], block_size: int) -> list[int]:
    """Keep the last block_size - 1 ids (at least one), leaving room for a new token."""
    ids = list(ids)
    keep = max(1, block_size - 1)
    if len(ids) > keep:
        log.warning("prompt of %d tokens is longer than the context window (%d): keeping its last %d tokens",
                    len(ids), block_size, keep)
        ids = ids[-keep:]
    return ids


@torch.no_grad()
def generate(model: Transformer, prompt: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> Iterator[int]:
    """Yield up to `max_new_tokens` ids continuing `prompt` (a non-empty id list).

    With the cache, the prompt is processed once and each step runs the model on the newest token only. When the
    window fills up, the cache is rebuilt from the last half window (amortized cost instead of a full recompute per
    token). `use_cache=False` recomputes everything every step: the slow reference the cache is tested against.
    """
    if not prompt:
        raise ValueError("generation needs a non-empty prompt")
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    block = model.config.block_size
    ids = crop_prompt(prompt, block)
    cache = KVCache(model.config, 1, device=device, dtype=model.tok_emb.weight.dtype) if use_cache else None
    pending = ids  # ids not yet in the cache
    try:
        for _ in range(max_new_tokens):
            if cache is None:
                x = torch.tensor([ids[-block:]], device=device)
            else:
                if cache.pos + len(pending) > block:  # window full: restart from the recent half window
                    cache.pos, pending = 0, ids[-max(1, block // 2):]
                x = torch.tensor([pending], device=device)
            logits = model(x, cache=cache, last_only=True).logits[:, -1, :]
            nxt = int(sample_next(logits, temperature, top_k, top_p, generator))
            ids.append(nxt)
            pending = [nxt]
            yield nxt
    finally:
        model.train(was_training)


def stream_text(model: Transformer, tokenizer: Tokenizer, prompt: str, cfg: SampleConfig,
                generator: torch.Generator | None = None) -> Iterator[str]:
    """Yield text pieces of one sample continuing `prompt`, stopping at any of cfg.stop (excluded) or at the
    tokenizer's end-of-text id. Joining the pieces gives the sample's full text."""
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    if tokenizer.bos_id is not None and prompt_ids[:1] != [tokenizer.bos_id]:
        prompt_ids = [tokenizer.bos_id, *prompt_ids]  # models trained with BOS expect it first (llama2.c, Llama)
    if not prompt_ids:  # an empty prompt starts from end-of-text (or the first id when there is none)
        prompt_ids = [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
    temperature = 0.0 if cfg.greedy else cfg.temperature
    new: list[int] = []
    emitted = 0
    hold = max((len(s) for s in cfg.stop), default=1) - 1
    for tok in generate(model, prompt_ids, cfg.max_new_tokens, temperature, cfg.top_k, cfg.top_p, generator):
        if tok == tokenizer.eot_id:
            break
        new.append(tok)
        text = tokenizer.decode(new)
        cut = min((i for i in (text.find(s, max(0, emitted - hold)) for s in cfg.stop) if i >= 0), default=-1)
        if cut >= 0:
            yield text[emitted:cut]
            return
        # Hold back a trailing replacement char (a multi-byte character may be half-decoded) and a tail that could
        # still grow into a stop string.
        safe = len(text.rstrip("\ufffd")) - hold
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text = tokenizer.decode(new)
    if len(text) > emitted:
        yield text[emitted:]
