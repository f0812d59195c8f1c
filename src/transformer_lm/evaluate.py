"""Loss, perplexity and bits per byte.

Bits per byte (bpb) divides the total information content by the UTF-8 size of the text, so it compares models with
different tokenizers: bpb = (mean loss in nats / ln 2) × tokens / bytes, over the tokens predicted (every one but
the first) and the bytes of their text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .model import Transformer
from .recurrent import RecurrentLM
from .tokenizers import Tokenizer
from .windows import check_ids, iter_eval_batches


@dataclass
class EvalResult:
    """What `tlm eval` and `Run.evaluate` report, and each periodic evaluation of a training run."""

    loss: float
    """Mean next-token cross-entropy in nats."""
    perplexity: float
    """exp(loss)."""
    bpb: float
    """Bits per UTF-8 byte of text."""
    tokens: int
    """Tokens predicted."""

    def to_dict(self) -> dict[str, float | int]:
        """The fields by name, as `tlm eval --json` prints them."""
        return asdict(self)

    def summary(self) -> str:
        return f"loss {self.loss:.4f}, ppl {self.perplexity:.2f}, bpb {self.bpb:.4f}"


def bits_per_byte(loss: float, tokens: float, num_bytes: float) -> float:
    """Bits per byte of a mean `loss` in nats over `tokens` predicted tokens whose text is `num_bytes` long."""
    return loss / math.log(2) * tokens / num_bytes


def predicted_bytes_per_token(tokenizer: Tokenizer, tokens: np.ndarray, num_bytes: int) -> float:
    """UTF-8 bytes per predicted token of a whole token stream whose text is `num_bytes` long: the first token is
    context, never predicted, so its bytes and itself are left out (counting them made a prepared val split's bpb
    differ from its text's)."""
    return (num_bytes - tokenizer.num_bytes(tokens[:1].tolist())) / max(1, len(tokens) - 1)


@torch.no_grad()
def evaluate_tokens(model: Transformer | RecurrentLM, tokens: np.ndarray, bytes_per_token: float, batch_size: int = 8,
                    max_batches: int | None = None, autocast: torch.autocast | nullcontext | None = None,
                    mask: np.ndarray | None = None, starts: np.ndarray | None = None) -> EvalResult:
    """Deterministic pass over `tokens` in consecutive windows of the model's context; every predicted token is
    weighted equally. `bytes_per_token` converts the loss to bits per byte. With a `mask` (conversations), only the
    tokens it marks are scored (the assistant's), the others being context; with their `starts`, each conversation
    on its own (windows.iter_eval_batches)."""
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    total, count = 0.0, 0
    try:
        for x, y in iter_eval_batches(tokens, batch_size, model.config.block_size, max_batches, mask,
                                     starts):
            check_ids(x, y, model.config.vocab_size)
            scored = int((y >= 0).sum())
            if not scored:  # all context: a mean over no targets is NaN
                continue
            with autocast or nullcontext():  # the loss with the head: no (B, T, vocab) logits (model.head_loss)
                loss = model(x.to(device), y.to(device)).loss
            total += float(loss) * scored
            count += scored
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("nothing to evaluate: the text has fewer than 2 tokens")
    loss = total / count
    return EvalResult(loss, math.exp(min(loss, 700.0)), bits_per_byte(loss, 1.0, bytes_per_token), count)


@torch.no_grad()
def token_logprobs(model: Transformer | RecurrentLM, ids: Sequence[int], top: int = 0, vocab_size: int | None = None
                   ) -> list[tuple[float, list[tuple[int, float]]]]:
    """Score a text: for each of ids[1:], its log-probability given the ids before it, and the `top` most likely ids
    at that place with theirs (most likely first), over the first `vocab_size` ids (the tokenizer's, where the
    model's table is padded beyond it; default all). One forward of the whole sequence: a Transformer's must fit its
    context window."""
    if isinstance(model, Transformer) and len(ids) > model.config.block_size:
        raise ValueError(f"{len(ids)} tokens are more than the context window of {model.config.block_size}; score "
                         "a shorter text")
    if len(ids) < 2:
        return []
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    try:
        logits = model(torch.tensor([list(ids)], device=device)).logits[0, :-1, :vocab_size].float()  # (n-1, V)
    finally:
        model.train(was_training)
    logprobs = logits.log_softmax(-1)
    chosen = logprobs.gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].tolist()
    if not top:
        return [(c, []) for c in chosen]
    values, indices = logprobs.topk(min(top, logprobs.size(1)), dim=-1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, indices.tolist(), values.tolist())]

