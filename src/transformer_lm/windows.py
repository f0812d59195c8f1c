"""Training windows and evaluation batches over a prepared split's tokens (data.py's arrays).

`BatchSampler` draws random training windows from a position that a checkpoint saves and restores exactly;
`iter_eval_batches` walks a split the same way every time, for evaluation. Of fine-tuning examples (a mask of the
tokens to learn and where each example starts), windows begin where examples do (`conversation_chunks`), the
examples a training window packs are kept apart (`BatchSampler.layout`), and evaluation rows hold one example each,
right-padded.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

MAX_REDRAWS = 1000
"""Windows a masked BatchSampler draws for one row before it gives up on finding a target in one."""


def conversation_chunks(starts: np.ndarray, n_tokens: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(begin, end) of the windows that cover conversations laid back to back (`starts`: where each begins), in
    order: each conversation's from its first token, and one longer than a window continued every block_size tokens.
    Window [b, e) predicts the tokens b+1 .. e, at most block_size of them and none past its conversation's end (its
    last predicts the next one's first token, context), so together they predict every token from 1 on once."""
    bounds = np.append(np.asarray(starts, dtype=np.int64), n_tokens - 1)
    counts = -(-np.diff(bounds) // block_size)  # windows per conversation (the last, of one token, may have none)
    first = np.repeat(bounds[:-1], counts)
    nth = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    begin = first + nth * block_size
    return begin, np.minimum(begin + block_size, np.repeat(bounds[1:], counts))


def _windows(tokens: np.ndarray, starts: Sequence[int], length: int,
             mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x = tokens[s : s + length], y = the same shifted by one, for each start: int64 (len(starts), length). With a
    `mask`, a target it marks 0 is -1 (the loss's no-target: model.head_loss)."""
    rows = np.stack([np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s in starts])
    rows = torch.from_numpy(rows)  # (B, T + 1)
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    if mask is not None:
        learned = torch.from_numpy(np.stack([np.asarray(mask[s + 1 : s + length + 1]) for s in starts]))
        y = torch.where(learned.bool(), y, -1)  # a new tensor: a one-row y may share rows' memory with x
    return x, y


def padded_windows(tokens: np.ndarray, begin: Sequence[int], end: Sequence[int],
            mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows [b, e) of different lengths as one batch, right-padded: x = tokens[b : e] then id 0, y = the targets
    `mask` marks among tokens[b + 1 : e + 1], else -1 (none, padding included). Padding after a row's tokens
    changes nothing before it in a causal model."""
    width = int(max(e - b for b, e in zip(begin, end)))
    x = torch.zeros(len(begin), width, dtype=torch.int64)
    y = torch.full((len(begin), width), -1, dtype=torch.int64)
    for row, (b, e) in enumerate(zip(begin, end)):
        x[row, : e - b] = torch.from_numpy(np.asarray(tokens[b:e], dtype=np.int64))
        targets = torch.from_numpy(np.asarray(tokens[b + 1 : e + 1], dtype=np.int64))
        y[row, : e - b] = torch.where(torch.from_numpy(np.asarray(mask[b + 1 : e + 1], dtype=bool)), targets, -1)
    return x, y


def _packed_layout(example_starts: np.ndarray, window_starts: np.ndarray, length: int) -> dict[str, torch.Tensor]:
    """Of windows [w, w + length) over examples laid back to back: each token's position in its example (counted
    from the window's start where the example began before it) and which example it is of (numbered from the
    window's first), int64 (len(window_starts), length): model.Transformer's `positions` and `segments`."""
    index = window_starts[:, None] + np.arange(length)
    example = np.searchsorted(example_starts, index, side="right") - 1
    first = np.maximum(np.asarray(example_starts)[example], window_starts[:, None])
    return {"positions": torch.from_numpy(index - first), "segments": torch.from_numpy(example - example[:, :1])}


def warn_long_examples(starts: np.ndarray, n_tokens: int, block_size: int, cut: bool = False) -> None:
    """Say how many fine-tuning examples do not fit the context window: past its first window, each goes on in
    windows that begin inside it, without the turns before (as `tlm eval` scores it); or, `cut` (DPO's pairs), is
    cut at its end."""
    lengths = np.diff(np.append(np.asarray(starts), n_tokens))
    long = int((lengths > block_size + 1).sum())
    if long:
        fate = "cut there (their later tokens count for nothing)" if cut else \
            "their later parts are learned without the context before them"
        log.warning("%d of %d training examples are longer than the %d-token window (the longest: %d tokens): "
                    "%s; a longer --model.block_size keeps them whole", long, len(lengths), block_size,
                    int(lengths.max()), fate)


def check_ids(x: torch.Tensor, y: torch.Tensor, vocab_size: int) -> None:
    """Raise DataError when a window holds an id the model has no embedding for: a prepared .bin that was edited,
    truncated into another dtype or made by another tokenizer (otherwise an IndexError, or on a GPU a device-side
    assert, deep in the embedding lookup). Cheap: one reduction over a batch already in host memory."""
    top = max(int(x.max()), int(y.max()))  # (a target of -1 is none: never above)
    if top >= vocab_size:
        raise DataError(f"the data holds token id {top}, but the model has embeddings for {vocab_size} ids only; "
                        "the prepared data is corrupt or from another tokenizer: prepare it again")


class BatchSampler:
    """Random training windows whose sequence resumes exactly from a checkpoint.

    Each row is a window of block_size + 1 tokens at a start uniform in [0, len(tokens) - block_size - 1], as
    x = window[:-1] and y = window[1:]; of conversations, at a start drawn uniformly from those of
    conversation_chunks, so that a reply is learned in the context of the turns before it, from the position 0 a
    chat starts at, as it is generated (the window runs on into the conversations after it: packed, no padding).
    The examples a window packs are kept apart by `layout` (the Transformer's `positions` and `segments` of the
    batch just drawn): each is computed as alone, from position 0, as it is evaluated and generated. Starts come
    from a torch.Generator owned by the sampler, so its state (with the count of batches drawn) is all
    `state_dict` needs for the next batches to match a run never stopped.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, vocab_size: int | None = None, mask: np.ndarray | None = None,
                 starts: np.ndarray | None = None):
        """`rank` of `world_size` keeps rows [rank·b, (rank+1)·b) of each global batch of `batch_size` rows, with
        b = batch_size / world_size: every rank draws the same starts, so the shards together are the global batch.
        With `vocab_size`, each batch is checked to hold only ids below it (check_ids). With a `mask`
        (conversations: PreparedData.train_mask), targets it marks 0 are none (-1), and a window with no target
        left is drawn again (from the same generator: resumes exactly), so that no row or batch is all context;
        with their `starts` (PreparedData.train_starts), windows begin where conversations do (the last ones at the
        last full window's start)."""
        if batch_size < 1 or block_size < 1:
            raise ConfigError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
        if len(tokens) < block_size + 1:
            raise DataError(f"the data has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1} for "
                            "one training window; use a smaller block_size or more data")
        if batch_size % world_size:
            raise ConfigError(f"batch_size {batch_size} is not divisible by the world size {world_size}")
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.shard = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0
        self.vocab_size, self.mask, self.starts = vocab_size, mask, starts
        self.anchors = None if starts is None else np.minimum(
            conversation_chunks(starts, len(tokens), block_size)[0], len(tokens) - block_size - 1)
        self.layout: dict[str, torch.Tensor] = {}

    def _start(self) -> int:
        """A window start; with a mask, one whose window holds a target (after at most MAX_REDRAWS tries)."""
        for _ in range(MAX_REDRAWS):
            if self.anchors is None:
                start = int(torch.randint(len(self.tokens) - self.block_size, (1,), generator=self.generator))
            else:
                start = int(self.anchors[int(torch.randint(len(self.anchors), (1,), generator=self.generator))])
            if self.mask is None or self.mask[start + 1 : start + self.block_size + 1].any():
                return start
        raise DataError(f"{MAX_REDRAWS} training windows in a row held no token to learn (a reply, a completion); "
                        "the examples are mostly context: use a longer block_size, or examples with longer replies")

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both int64 of shape (batch_size / world_size, block_size)."""
        if self.mask is None and self.anchors is None:
            starts = torch.randint(len(self.tokens) - self.block_size, (self.batch_size,), generator=self.generator)
        else:  # every rank draws every row's start, so that the generators stay in step
            starts = torch.tensor([self._start() for _ in range(self.batch_size)])
        self.batches_drawn += 1
        # the global batch's targets, which every rank can count (it drew every start): a step's losses are weighted
        # by them, so that each target counts alike however the rows or micro-batches split them (train.py)
        self.targets = self.batch_size * self.block_size if self.mask is None else \
            sum(int(self.mask[s + 1 : s + self.block_size + 1].sum()) for s in starts.tolist())
        x, y = _windows(self.tokens, starts[self.shard].tolist(), self.block_size, self.mask)
        if self.vocab_size is not None:
            check_ids(x, y, self.vocab_size)
        if self.starts is not None:
            self.layout = _packed_layout(self.starts, starts[self.shard].numpy(), self.block_size)
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])


def iter_eval_batches(tokens: np.ndarray, batch_size: int, block_size: int, max_batches: int | None = None,
                      mask: np.ndarray | None = None,
                      starts: np.ndarray | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every window of a split once, in order: the same batches on every call.

    Windows start at 0, block_size, 2 * block_size, ... so the targets y are exactly tokens[1:], each once.
    Full windows come batch_size at a time (the last batch may have fewer rows); a shorter tail window comes
    last as a (1, r) batch, so weight each batch's mean loss by its targets' count (y.numel(), or with a `mask`,
    whose 0s are no target (-1), (y >= 0).sum()). Stops after `max_batches` if given. Of conversations (a `mask`
    and their `starts`), the windows are conversation_chunks', right-padded to a batch's longest (padded_windows): each
    conversation is scored on its own from its first token, as a chat is generated.
    """
    if batch_size < 1 or block_size < 1:
        raise ConfigError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
    if len(tokens) < 2:
        raise DataError(f"the split has {len(tokens)} token(s); evaluation needs at least 2: add more text")
    if starts is not None:
        begin, end = conversation_chunks(starts, len(tokens), block_size)
        for i in range(0, len(begin), batch_size)[:max_batches]:
            yield padded_windows(tokens, begin[i : i + batch_size], end[i : i + batch_size], mask)
        return
    n_full, tail = divmod(len(tokens) - 1, block_size)
    starts = range(0, n_full * block_size, block_size)
    batches = [(starts[i : i + batch_size], block_size) for i in range(0, n_full, batch_size)]
    if tail:
        batches.append(([n_full * block_size], tail))
    for rows, length in itertools.islice(batches, max_batches):
        yield _windows(tokens, rows, length, mask)
