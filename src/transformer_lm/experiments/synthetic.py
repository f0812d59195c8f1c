"""Synthetic long-range tasks, generated on the fly from a seeded generator: the answer to each question is a token a
controlled distance back.

- **associative recall**: `n_pairs` key-value pairs (distinct keys), a separator, then `n_queries` queries, each an
  earlier key followed by its value. The answer to a query is the value that followed the same key in the pairs.
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
    """Pairs `k v` (distinct keys from `n_keys`, values from `n_values`), a separator, then queries `q a`.

    Tokens: keys 0..n_keys-1, values n_keys..n_keys+n_values-1, the separator last. With pairs at positions (2j, 2j+1)
    and query i at 2·n_pairs + 1 + 2i, a query asking pair j predicts its answer at distance 2(n_pairs + i - j) from
    the pair's value. Chance accuracy is 1/n_values."""

    n_pairs: int = 32
    n_queries: int = 8
    n_keys: int = 64
    n_values: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.n_queries <= self.n_pairs <= self.n_keys or self.n_values < 2:
            raise ConfigError(f"associative recall needs 1 <= n_queries ({self.n_queries}) <= n_pairs "
                              f"({self.n_pairs}) <= n_keys ({self.n_keys}) and n_values >= 2")

    @property
    def vocab_size(self) -> int:
        return self.n_keys + self.n_values + 1

    @property
    def seq_len(self) -> int:
        return 2 * self.n_pairs + 1 + 2 * self.n_queries - 1  # the last answer is only predicted, never input

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    def distances(self) -> list[int]:
        """The distances `sample(distance=d)` accepts: even, from 2·n_queries to 2·n_pairs."""
        return list(range(2 * self.n_queries, 2 * self.n_pairs + 1, 2))

    def sample(self, batch_size: int, generator: torch.Generator, distance: int | None = None) -> TaskBatch:
        """A batch of sequences. Queries ask a random subset of the pairs in random order, or, with `distance`,
        query i asks pair n_pairs + i - distance/2, so that every answer stands exactly `distance` back."""
        n, m = self.n_pairs, self.n_queries
        if distance is not None and distance not in self.distances():
            raise ConfigError(f"associative recall distance must be even and in [{2 * m}, {2 * n}], got {distance}")
        keys = torch.rand(batch_size, self.n_keys, generator=generator).argsort(dim=1)[:, :n]  # (B, n) distinct
        values = self.n_keys + torch.randint(0, self.n_values, (batch_size, n), generator=generator)  # (B, n)
        if distance is None:
            asked = torch.rand(batch_size, n, generator=generator).argsort(dim=1)[:, :m]  # (B, m) distinct pairs
        else:
            asked = (n + torch.arange(m) - distance // 2).expand(batch_size, m)
        seq = torch.empty(batch_size, 2 * n + 1 + 2 * m, dtype=torch.long)
        seq[:, 0:2 * n:2], seq[:, 1:2 * n:2] = keys, values
        seq[:, 2 * n] = self.n_keys + self.n_values  # separator
        seq[:, 2 * n + 1::2] = keys.gather(1, asked)
        seq[:, 2 * n + 2::2] = values.gather(1, asked)
        ids, answers = seq[:, :-1], seq[:, 1:]
        targets = torch.full_like(ids, -1)
        dist = torch.full_like(ids, -1)
        query_pos = 2 * n + 1 + 2 * torch.arange(m)  # (m,)
        targets[:, query_pos] = answers[:, query_pos]
        dist[:, query_pos] = query_pos - (2 * asked + 1)
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
