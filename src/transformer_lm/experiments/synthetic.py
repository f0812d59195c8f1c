"""Synthetic long-range tasks, generated on the fly from a seeded generator: the answer to each question is a token a
controlled distance back.

- **associative recall**: `n_pairs` key-value pairs (distinct keys, one token each), a separator, then `n_queries`
  queries, each an earlier key. The answer to a query is the value paired with that key.
- **copy**: `length` distinct symbols, a separator, then the same symbols again. Symbols are drawn without
  replacement, so each copied token's source is unambiguous (a lookup, not arithmetic on positions).

A batch is a `TaskBatch`: ids (B, T); targets (B, T) holding the answer at each position that predicts one and -1
elsewhere (the models' ignore_index, so the loss counts answers only); distance (B, T), for each answer the number of
positions back from the predicting position to the token that holds the answer (-1 where there is no answer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass
class TaskBatch:
    ids: torch.Tensor
    """(B, T) input token ids."""
    targets: torch.Tensor
    """(B, T) the answer predicted at each position, -1 where there is none."""
    distance: torch.Tensor
    """(B, T) positions from the predicting position back to the token holding its answer, -1 where no answer."""


@dataclass(frozen=True)
class AssociativeRecall:
    """`n_pairs` key-value pairs, each one token (its key from `n_keys`, distinct in a row, and its value from
    `n_values`), a separator, then `n_queries` queries, each the key of a different earlier pair; the answer to a
    query, predicted at its position, is that pair's value.

    Tokens: pair (k, v) is k·n_values + v, then the keys as queries, the values as answers, the separator, the
    padding. Pair j sits at position j and query i at n_pairs + 1 + i, so its answer stands n_pairs + 1 + i - j back.
    Training rows hold from `min_pairs` to `n_pairs` pairs (padded at the start; query slots beyond the row's pairs
    padded at the end), so that some rows are easy from the start. Both choices come from what a 2-layer 64-wide
    Transformer learned in 1,000-1,500 steps here: with a key token followed by a value token (an induction circuit
    to form) it stayed at chance at 32 pairs; with one token per pair it learned 16 and 24 pairs (100 %, 85 %) but
    not 32 or 64. Chance accuracy is 1/n_values."""

    n_pairs: int = 64
    n_queries: int = 32
    n_keys: int = 64
    n_values: int = 8
    min_pairs: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_pairs <= self.n_pairs <= self.n_keys or not 1 <= self.n_queries <= self.n_pairs \
                or self.n_values < 2:
            raise ConfigError(f"associative recall needs 1 <= min_pairs ({self.min_pairs}) <= n_pairs "
                              f"({self.n_pairs}) <= n_keys ({self.n_keys}), 1 <= n_queries ({self.n_queries}) <= "
                              f"n_pairs and n_values >= 2")

    @property
    def vocab_size(self) -> int:
        return self.n_keys * self.n_values + self.n_keys + self.n_values + 2

    @property
    def seq_len(self) -> int:
        return self.n_pairs + 1 + self.n_queries

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    def distances(self) -> list[int]:
        """The distances `sample(distance=d)` accepts: 2 to n_pairs + n_queries."""
        return list(range(2, self.n_pairs + self.n_queries + 1))

    def sample(self, batch_size: int, generator: torch.Generator, distance: int | None = None) -> TaskBatch:
        """A batch of rows of min_pairs..n_pairs pairs whose queries ask a random subset of them in random order.
        With `distance`: full rows in which query i asks pair n_pairs + 1 + i - distance wherever that pair exists,
        so that those answers stand exactly `distance` back; the other queries ask other pairs at random, as in
        training (score them apart by `distance`)."""
        n, m, V = self.n_pairs, self.n_queries, self.n_values
        if distance is not None and distance not in self.distances():
            raise ConfigError(f"associative recall distance must be in [2, {n + m}], got {distance}")
        keys = torch.rand(batch_size, self.n_keys, generator=generator).argsort(dim=1)[:, :n]  # (B, n) distinct
        values = torch.randint(0, V, (batch_size, n), generator=generator)  # (B, n)
        slot = torch.arange(n)[None, :]  # (1, n)
        if distance is None:
            used = torch.randint(self.min_pairs, n + 1, (batch_size, 1), generator=generator)  # (B, 1) pairs per row
            # each row asks its own pairs (the last `used` slots) in random order, as many as fit in the m queries
            order = torch.rand(batch_size, n, generator=generator).masked_fill(slot < n - used, 2.0).argsort(dim=1)
            asked = order[:, :m]  # (B, m)
            live = torch.arange(m)[None, :] < used  # (B, m) query slots in use
        else:
            used = torch.full((batch_size, 1), n)
            live = torch.ones(batch_size, m, dtype=torch.bool)
            wanted = n + 1 + torch.arange(m) - distance  # (m,) the pair each query slot would ask
            exists = (wanted >= 0) & (wanted < n)
            free = torch.ones(n, dtype=torch.bool)
            free[wanted[exists]] = False
            others = free.nonzero().squeeze(1)  # pairs no slot at this distance asks: at least m - exists.sum()
            shuffled = others[torch.rand(batch_size, len(others), generator=generator).argsort(dim=1)]
            asked = wanted.clamp(0, n - 1).repeat(batch_size, 1)  # (B, m)
            asked[:, ~exists] = shuffled[:, :int((~exists).sum())]
        query_base, value_base = self.n_keys * V, self.n_keys * V + self.n_keys
        sep, pad = value_base + V, value_base + V + 1
        ids = torch.empty(batch_size, n + 1 + m, dtype=torch.long)
        ids[:, :n] = torch.where(slot >= n - used, keys * V + values, pad)
        ids[:, n] = sep
        ids[:, n + 1:] = torch.where(live, query_base + keys.gather(1, asked), pad)
        targets = torch.full_like(ids, -1)
        dist = torch.full_like(ids, -1)
        targets[:, n + 1:] = torch.where(live, value_base + values.gather(1, asked), -1)
        dist[:, n + 1:] = torch.where(live, n + 1 + torch.arange(m) - asked, -1)
        return TaskBatch(ids, targets, dist)


@dataclass(frozen=True)
class Copy:
    """`length` distinct symbols (from `n_symbols`), a separator, then the symbols again; rows shorter than
    `length` (training mixes lengths from `min_length`) are padded at the end.

    Tokens: symbols 0..n_symbols-1, then the separator and the padding. Every copied symbol is predicted at distance
    `length` from its source (the row's own length). Chance accuracy is 1/n_symbols."""

    length: int = 64
    n_symbols: int = 128
    min_length: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_length <= self.length <= self.n_symbols:
            raise ConfigError(f"copy needs 1 <= min_length ({self.min_length}) <= length ({self.length}) <= "
                              f"n_symbols ({self.n_symbols}): the symbols of a row are distinct")

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + 2

    @property
    def seq_len(self) -> int:
        return 2 * self.length

    @property
    def chance(self) -> float:
        return 1.0 / self.n_symbols

    def distances(self) -> list[int]:
        """The distances `sample(distance=d)` accepts: the copy lengths."""
        return list(range(self.min_length, self.length + 1))

    def sample(self, batch_size: int, generator: torch.Generator, distance: int | None = None) -> TaskBatch:
        """A batch of rows of random lengths in [min_length, length], or all of length `distance`."""
        if distance is not None and distance not in self.distances():
            raise ConfigError(f"copy distance must be in [{self.min_length}, {self.length}], got {distance}")
        L, sep, pad = self.length, self.n_symbols, self.n_symbols + 1
        if distance is None:
            lengths = torch.randint(self.min_length, L + 1, (batch_size,), generator=generator)
        else:
            lengths = torch.full((batch_size,), distance)
        symbols = torch.rand(batch_size, self.n_symbols, generator=generator).argsort(dim=1)[:, :L]  # (B, L)
        seq = torch.full((batch_size, 2 * L + 1), pad, dtype=torch.long)
        pos = torch.arange(2 * L + 1)[None, :]  # (1, 2L+1)
        n = lengths[:, None]  # (B, 1)
        source = pos < n
        copy = (pos > n) & (pos <= 2 * n)
        seq[source] = symbols[source[:, :L]]
        seq[pos.expand_as(seq) == n] = sep
        seq[copy] = symbols.gather(1, (pos - n - 1).clamp(0, L - 1).expand_as(seq))[copy]
        ids, answers = seq[:, :-1], seq[:, 1:]
        predicts = copy[:, 1:]  # position p predicts seq[p+1], a copied symbol
        targets = torch.where(predicts, answers, -1)
        dist = torch.where(predicts, n.expand_as(ids), -1)
        return TaskBatch(ids, targets, dist)


Task = AssociativeRecall | Copy
