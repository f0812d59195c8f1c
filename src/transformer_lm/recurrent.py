"""Recurrent language models — LSTM (Hochreiter & Schmidhuber 1997) and the Elman RNN — behind the Transformer's
interface, as the baselines the experiments compare it with (`ModelConfig.arch` = lstm | rnn).

token embedding → dropout → n_layer × (LSTM | tanh RNN) of width n_embd → dropout → LM head

A RecurrentLM is trained, checkpointed, sampled and evaluated by the same code as the Transformer: forward(idx,
targets, cache=..., last_only=...) -> LMOutput, init_weights(seed), num_params(), make_cache(). What replaces the KV
cache is the hidden state: RecurrentCache keeps the state after each of the last positions written, so moving `pos`
back (a restart, or speculative decoding dropping rejected proposals) is exact, as it is for a KV cache; and since
it keeps only the last ones, a generation goes on past block_size (the training window) with its state carried.

Without a cache the whole sequence goes through torch's fused nn.LSTM / nn.RNN; with a cache (or a padding mask) the
model steps through time one position at a time, recording each state.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .config import ModelConfig
from .errors import ConfigError
from .model import LMOutput, head_loss

log = logging.getLogger(__name__)

State = tuple[torch.Tensor, torch.Tensor] | torch.Tensor
"""(h, c) of an LSTM or h of an RNN, each (n_layer, B, n_embd): what nn.LSTM / nn.RNN take and return."""


def warn_unused_fields(config: ModelConfig) -> None:
    """Log which Transformer-only fields a recurrent `config` sets and ignores (ModelConfig.unused_fields): a run
    that asked for them would otherwise silently differ from what was asked."""
    unused = config.unused_fields()
    if unused:
        log.warning("model.arch=%s does not use %s (attention, position and feed-forward settings): ignored; a "
                    "recurrent model is set by n_layer, n_embd, bias, tie_embeddings and dropout", config.arch,
                    ", ".join(f"model.{k}={v}" for k, v in unused.items()))


def runs_in_float32(config: ModelConfig, device: torch.device) -> bool:
    """Whether the recurrence of `config`'s model runs in float32 under any autocast on `device` (an LSTM on a CPU:
    RecurrentLM._recur), so that its FLOPs, nearly all of them, are measured against the float32 peak."""
    return config.arch == "lstm" and device.type == "cpu"


class RecurrentCache(nn.Module):
    """The hidden state after each of the last max_len positions: h (and the LSTM's cell c) of every layer,
    preallocated like a KV cache, in a ring (the state after position p in slot p % max_len).

    `pos` is the number of positions consumed; the state to continue from is the one written after position pos-1
    (zeros at pos 0), so setting `pos` back by less than max_len (or to 0) rewinds exactly. Unlike a KV cache it
    never fills up: a recurrent model has no context window, and its state carries on past max_len positions.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.max_len = max_len or config.block_size
        shape = (self.max_len, config.n_layer, batch_size, config.n_embd)
        self.register_buffer("h", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("c", torch.zeros(shape, device=device, dtype=dtype) if config.arch == "lstm" else None,
                             persistent=False)
        self.pos = 0

    def state(self) -> State:
        """The state after the first `pos` positions."""
        if self.pos == 0:
            h = torch.zeros_like(self.h[0])
            return h if self.c is None else (h, torch.zeros_like(h))
        slot = (self.pos - 1) % self.max_len
        return self.h[slot] if self.c is None else (self.h[slot], self.c[slot])

    def reset(self) -> None:
        """Start over from the zero state."""
        self.pos = 0

    def write(self, position: int, state: State) -> None:
        """Record the state after absolute `position` (0-based)."""
        slot = position % self.max_len
        if self.c is None:
            self.h[slot] = state
        else:
            self.h[slot], self.c[slot] = state


class RecurrentLM(nn.Module):
    """Token embedding → stacked LSTM or tanh RNN → LM head predicting the next token; no positions: order lives in
    the state. Like Transformer, construction does not initialize: call `init_weights()` or load a state dict."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch not in ("lstm", "rnn"):
            raise ConfigError(f"RecurrentLM builds lstm or rnn models, got model.arch={config.arch!r}")
        self.config = config
        d = config.n_embd
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.dropout = nn.Dropout(config.dropout)
        kind = nn.LSTM if config.arch == "lstm" else nn.RNN
        # dropout between stacked layers; the input and output dropouts above and below complete Zaremba et al.'s
        # "dropout on the non-recurrent connections"
        self.rnn = kind(d, d, num_layers=config.n_layer, bias=config.bias, batch_first=True,
                        dropout=config.dropout if config.n_layer > 1 else 0.0)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> RecurrentLM:
        """torch's own defaults, drawn from the seeded generator: embeddings N(0, 1), recurrent matrices U(±1/√d);
        an untied head N(0, 0.02); zero biases but the LSTM forget gate's, set to 1 so that the cell keeps its memory
        at the start of training (Jozefowicz et al. 2015).

        Unit-scale embeddings, not the Transformer's 0.02: its LayerNorm rescales whatever enters a block, but the
        gates see the embedding as it is, and Adam's steps have an absolute size. Measured on the test corpus (char,
        2×64 LSTM, 300 steps at lr 2e-3): val loss 3.30 from N(0, 0.02) embeddings (barely off unigram), 0.62 from
        N(0, 1), where a Transformer of the same width reached 0.63."""
        gen = torch.Generator(device=self.tok_emb.weight.device)
        gen.manual_seed(seed) if seed is not None else gen.seed()
        self.tok_emb.weight.normal_(0.0, 1.0, generator=gen)
        if not self.config.tie_embeddings:
            self.lm_head.weight.normal_(0.0, 0.02, generator=gen)
        bound = 1.0 / math.sqrt(self.config.n_embd)
        d = self.config.n_embd
        for name, p in self.rnn.named_parameters():
            if name.startswith("weight"):
                p.uniform_(-bound, bound, generator=gen)
            else:
                p.zero_()
                if self.config.arch == "lstm" and name.startswith("bias_ih"):
                    p[d:2 * d] = 1.0  # gates are stacked (input, forget, cell, output)
        return self

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, a tied matrix counted once; `exclude_embeddings` drops the token table (an untied head
        stays), as Transformer.num_params does."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embeddings else n

    def make_cache(self, batch_size: int, max_len: int | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> RecurrentCache:
        """An empty state cache for incremental decoding of `batch_size` rows, up to `max_len` positions."""
        w = self.tok_emb.weight
        return RecurrentCache(self.config, batch_size, max_len, device or w.device, dtype or w.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache: RecurrentCache | None = None,
                last_only: bool = False, return_attentions: bool = False, positions: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> LMOutput:
        """idx (B, T) token ids, called as Transformer.forward is. `cache` continues from cache.pos's state;
        `key_mask` (B, cache.pos + T or more), False at left padding, leaves the state untouched there (so a padded
        row starts from the zero state at its first real token). `positions` is accepted and unused: a recurrent model
        has no position encoding. There are no attention weights to return."""
        del positions
        if return_attentions:
            raise ConfigError(f"an {self.config.arch} model has no attention weights; attention maps need a model "
                              "with model.arch=transformer")
        x = self.dropout(self.tok_emb(idx))  # (B, T, C)
        if cache is None and key_mask is None:
            y, _ = self._recur(x)  # (B, T, C): one fused call over the whole sequence
        else:
            y = self._step_through(x, cache, key_mask)
        y = self.dropout(y)
        if last_only:
            y = y[:, -1:, :]
        return head_loss(self.lm_head, y, targets)

    def _recur(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """self.rnn(x, state), an LSTM on a CPU with autocast off: under a bfloat16 or float16 CPU autocast, torch's
        oneDNN LSTM kernel fails to build ("could not create a primitive descriptor", so `--train.dtype bfloat16`
        crashed at the first step). The LSTM is on none of CPU autocast's lists: without oneDNN it runs in float32
        under autocast too, as it does here; the LM head after it still runs in the autocast dtype."""
        if runs_in_float32(self.config, x.device) and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return self.rnn(x, state)
        return self.rnn(x, state)

    def _step_through(self, x: torch.Tensor, cache: RecurrentCache | None, key_mask: torch.Tensor | None
                      ) -> torch.Tensor:
        """Run the stack one position at a time from the cache's state, writing every new state into the cache."""
        B, T, C = x.shape
        start = cache.pos if cache is not None else 0
        if cache is not None:
            state = cache.state()
        else:
            h = x.new_zeros(self.config.n_layer, B, C)
            state = h if self.config.arch == "rnn" else (h, torch.zeros_like(h))
        outputs = []
        for t in range(T):
            y, new = self._recur(x[:, t:t + 1], state)  # y (B, 1, C): the top layer's h
            if key_mask is not None:  # padding leaves every layer's state as it was
                keep = key_mask[:, start + t].view(1, B, 1)
                new = torch.where(keep, new, state) if isinstance(new, torch.Tensor) else \
                    (torch.where(keep, new[0], state[0]), torch.where(keep, new[1], state[1]))
            state = new
            if cache is not None:
                cache.write(start + t, state)
            outputs.append(y)
        if cache is not None:
            cache.pos += T
        return torch.cat(outputs, dim=1)
