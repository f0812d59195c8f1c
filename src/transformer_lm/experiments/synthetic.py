"""Synthetic long-range tasks, generated on the fly from a seeded generator: the answer to each question is a token a
controlled distance back.

- **associative recall**: `length` distinct symbols, a separator, then the symbols again as queries, in random order.
  The answer to a query is the symbol that followed it: each symbol is the key of the next.
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
    """`length` distinct symbols (from `n_symbols`), a separator, then every symbol but the last once more, in random
    order, as a query: its answer, predicted at the query, is the symbol that followed it. Each symbol is the key of
    the next, the form of the task that induction heads solve (Olsson et al., 2022). Rows shorter than `length`
    (training mixes lengths from `min_length`) are padded at the end.

    Tokens: symbols 0..n_symbols-1, then the separator and the padding. A row of n symbols holds the query for symbol
    a at position n + 1 + j (j its place among the queries), so its answer stands n + j - a back: 2 to 2n - 2.
    Chance accuracy is 1/(length - 1), a guess among the symbols of the row that follow another.

    Why this form (measured with `LongRangeConfig`'s defaults, one thread): with one token per pair (key k and value
    v fused into token k·n_values + v, so one attention lookup answers) the Transformer must learn n_keys·n_values
    embeddings; it learned 24 pairs of 4 values (100 %; the LSTM 87 %, at learning rate 3e-3), but 32 pairs of 16
    values left both near chance (7 % and 8 %, chance 6 %) after 1,500 steps. Here a single match-and-copy circuit
    serves every symbol: at 32 symbols the Transformer answered 99.6-100 % at every distance (seeds 0 and 2; seed 1
    94.5 % at the longest), while the LSTM stayed at chance (0-5 %) at every distance, even at distance 2, at
    learning rate 1e-3 or 3e-3 and with 3,000 steps: it does not learn to hold which symbol followed which (in a trial
    with 8 symbols and 4,000 steps it reached 17 %, chance 14 %)."""

    length: int = 32
    n_symbols: int = 64
    min_length: int = 2

    def __post_init__(self) -> None:
        if not 2 <= self.min_length <= self.length <= self.n_symbols:
            raise ConfigError(f"associative recall needs 2 <= min_length ({self.min_length}) <= length "
                              f"({self.length}) <= n_symbols ({self.n_symbols}): the symbols of a row are distinct "
                              "and a row asks at least one")

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + 2

    @property
    def seq_len(self) -> int:
        return 2 * self.length

    @property
    def chance(self) -> float:
        return 1.0 / (self.length - 1)

    def distances(self) -> list[int]:
        """The distances `sample(distance=d)` accepts: 2 to 2·length - 2."""
        return list(range(2, 2 * self.length - 1))

    def sample(self, batch_size: int, generator: torch.Generator, distance: int | None = None) -> TaskBatch:
        """A batch of rows of random lengths in [min_length, length], each asking its symbols in random order. With
        `distance`: full rows in which one query, at a random slot among those that can, asks the symbol whose
        successor stands exactly `distance` back; the others ask the remaining symbols in random order, as in training
        (so a few of them may stand at `distance` too)."""
        L, sep, pad = self.length, self.n_symbols, self.n_symbols + 1
        if distance is not None and distance not in self.distances():
            raise ConfigError(f"associative recall distance must be in [2, {2 * L - 2}], got {distance}")
        symbols = torch.rand(batch_size, self.n_symbols, generator=generator).argsort(dim=1)[:, :L]  # (B, L)
        slot = torch.arange(L - 1)[None, :]  # (1, L-1): query slots, and the symbols they can ask
        if distance is None:
            lengths = torch.randint(self.min_length, L + 1, (batch_size, 1), generator=generator)  # (B, 1)
            # each row asks its own symbols but the last (indices below length - 1) in random order
            noise = torch.rand(batch_size, L - 1, generator=generator).masked_fill(slot >= lengths - 1, 2.0)
            asked = noise.argsort(dim=1)  # (B, L-1)
        else:
            lengths = torch.full((batch_size, 1), L)
            asked = torch.rand(batch_size, L - 1, generator=generator).argsort(dim=1)
            # slot j asks symbol L + j - distance, which must lie in [0, L - 2]
            lo, hi = max(0, distance - L), min(L - 2, distance - 2)
            j = torch.randint(lo, hi + 1, (batch_size, 1), generator=generator)  # (B, 1)
            a = L + j - distance
            k = (asked == a).long().argmax(dim=1, keepdim=True)  # where the random order put symbol a
            asked.scatter_(1, k, asked.gather(1, j))  # swap it into slot j
            asked.scatter_(1, j, a)
        live = slot < lengths - 1  # (B, L-1) query slots in use
        query_pos = lengths + 1 + slot  # (B, L-1), at most 2L - 1; past the row's end where not live
        ids = torch.full((batch_size, 2 * L), pad, dtype=torch.long)
        ids[:, :L] = torch.where(torch.arange(L)[None, :] < lengths, symbols, pad)
        ids.scatter_(1, lengths, sep)
        ids.scatter_(1, query_pos, torch.where(live, symbols.gather(1, asked), pad))
        targets = torch.full_like(ids, -1).scatter_(1, query_pos, torch.where(live, symbols.gather(1, asked + 1), -1))
        dist = torch.full_like(ids, -1).scatter_(1, query_pos, torch.where(live, query_pos - asked - 1, -1))
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
