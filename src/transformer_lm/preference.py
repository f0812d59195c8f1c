"""Direct preference optimization (Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model"): fine-tune a model on pairs of completions of one prompt, the chosen one preferred to the
rejected one, with neither a reward model nor sampling.

The policy π (the model trained) and a frozen reference π_ref (the model it starts from) score a completion by the
summed log-probability of its tokens given the prompt; each side's implicit reward is β (log π - log π_ref), and the
loss is -log σ(reward(chosen) - reward(rejected)): the Bradley-Terry likelihood of the preference, under which the
policy moves towards the chosen completions and away from the rejected ones, by as much as β lets it stray from the
reference (β weights the paper's KL penalty: small β, far). It is ln 2 at the start, where the policy is the reference.
A pair is ranked right when its chosen reward is above its rejected one: the reward accuracy TRL's DPOTrainer logs,
reported here with the rewards' margin.

`loss` chooses among the paper's sigmoid and the variants TRL's DPOTrainer names the same way, as functions of the
margin m = reward(chosen) - reward(rejected): hinge, max(0, 1 - m) (SLiC, Zhao et al., 2023); robust, the sigmoid
loss corrected for a fraction ε of flipped labels, ((1 - ε)(-log σ(m)) - ε(-log σ(-m))) / (1 - 2ε) (Chowdhury et
al., 2024); ipo, (h - 1/(2β))², h the difference of the two sides' log-ratios log π - log π_ref each averaged over
its completion's tokens (Azar et al., 2023, as TRL and the paper's authors normalize it). `nll_weight` α adds α
times the chosen completions' negative log-likelihood per token (RPO, Pang et al., 2024: TRL's loss_type
["sigmoid", "sft"] with weights [1, α]), which keeps the chosen completions' likelihood from falling as the margin
grows.

The reference costs a forward pass of every pair without gradients: a LoRA fine-tune's is its own model with the
adapters off (`lora.adapters_off`: no second copy of the weights), a full fine-tune's a frozen float32 copy of the
weights it starts from. Pairs are data.py's examples two by two (chat_data.encode_pair: chosen, then rejected); a
batch holds whole pairs, each right-padded row one completion with its prompt, never packed with another.
"""

from __future__ import annotations

import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .errors import ConfigError, DataError
from .lora import LoRALinear, adapters_off
from .windows import check_ids, padded_windows

DPO_LOSSES: tuple[str, ...] = typing.get_args(typing.get_type_hints(TrainConfig)["dpo_loss"])  # train.dpo_loss's


def pair_windows(starts: np.ndarray, n_tokens: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(begin, end) of each example's row: from its first token, predicting its tokens up to its last or the
    block_size-th (a longer one is cut there: its later tokens count for nothing)."""
    begin = np.asarray(starts, dtype=np.int64)
    end = np.minimum(np.append(begin[1:], n_tokens) - 1, begin + block_size)
    return begin, end


def pair_batch(tokens: np.ndarray, mask: np.ndarray, begin: np.ndarray, end: np.ndarray,
               pairs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `pairs` (indices) as one batch: their chosen examples, then their rejected ones in the same order,
    right-padded (padded_windows: x with id 0, y with -1)."""
    rows = np.concatenate([2 * pairs, 2 * pairs + 1])
    return padded_windows(tokens, begin[rows], end[rows], mask)


class PairSampler:
    """Random batches of preference pairs, every pair once an epoch (a new permutation each, from a torch.Generator
    the sampler owns: its state, the permutation and the position in it are all a checkpoint needs to resume
    exactly). A batch's rows are its pairs' chosen examples, then their rejected ones, in the same order."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, starts: np.ndarray, batch_size: int, block_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, vocab_size: int | None = None) -> None:
        """`rank` of `world_size` keeps pairs [rank·b, (rank+1)·b) of each global batch of `batch_size` pairs
        (b = batch_size / world_size); with `vocab_size`, each batch is checked to hold only ids below it."""
        if batch_size % world_size:
            raise ConfigError(f"batch_size {batch_size} is not divisible by the world size {world_size}")
        self.tokens, self.mask, self.batch_size, self.vocab_size = tokens, mask, batch_size, vocab_size
        self.begin, self.end = pair_windows(starts, len(tokens), block_size)
        self.n_pairs = len(self.begin) // 2
        self.shard = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(self.n_pairs, generator=self.generator)
        self.pos = 0
        self.targets = batch_size
        """Pairs in the global batch: a micro-batch's loss is weighted by its share (train.py)."""

    def tokens_per_pair(self) -> float:
        """The mean tokens a pair's two rows hold (padding not counted): a step's expected tokens, for budgets."""
        return float((self.end - self.begin).sum()) / self.n_pairs

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): int64 (2 · batch_size / world_size, longest row), this rank's chosen rows then its rejected ones,
        right-padded (x with id 0, y with -1: no target)."""
        picked = []
        while len(picked) < self.batch_size:
            if self.pos == self.n_pairs:
                self.order, self.pos = torch.randperm(self.n_pairs, generator=self.generator), 0
            take = min(self.batch_size - len(picked), self.n_pairs - self.pos)
            picked += self.order[self.pos : self.pos + take].tolist()
            self.pos += take
        x, y = pair_batch(self.tokens, self.mask, self.begin, self.end, np.asarray(picked[self.shard], dtype=np.int64))
        if self.vocab_size is not None:
            check_ids(x, y, self.vocab_size)
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["order"]) != self.n_pairs:
            raise DataError(f"the checkpoint's sampler is of {len(state['order'])} preference pairs, the data has "
                            f"{self.n_pairs}; resume on the data the run was trained on")
        self.generator.set_state(state["generator"])
        self.order, self.pos = state["order"].clone(), int(state["pos"])


def completion_logprobs(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its targets (y, -1: none), in float32: (B, T, V), (B, T) -> (B,)."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
    return -nll.view(y.shape).sum(1)


@dataclass
class PreferenceResult:
    """A DPO evaluation (or a training step's pairs): the means over its pairs."""

    loss: float
    """The training loss (DPO's loss: -log σ(reward(chosen) - reward(rejected)) for the sigmoid one, ln 2 = 0.6931
    where the policy is the reference), in nats."""
    accuracy: float
    """The fraction of pairs whose chosen reward is above their rejected one."""
    margin: float
    """reward(chosen) - reward(rejected)."""
    chosen_reward: float
    """β (log π - log π_ref) of the chosen completions."""
    rejected_reward: float
    pairs: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def summary(self) -> str:
        return f"DPO loss {self.loss:.4f}, reward accuracy {self.accuracy:.1%}, margin {self.margin:.3f}"


class DPO:
    """The loss of a batch of pairs (PairSampler's rows) for a policy against its reference (see the module
    docstring): the reference is `reference`, frozen, or where it is None the policy `model` with its LoRA
    adapters off."""

    def __init__(self, model: nn.Module, beta: float, reference: nn.Module | None = None, loss: str = "sigmoid",
                 label_smoothing: float = 0.0, nll_weight: float = 0.0) -> None:
        if reference is None and not any(isinstance(m, LoRALinear) for m in model.modules()):
            raise ConfigError("DPO without a reference model needs LoRA adapters to turn off; give the reference")
        if loss not in DPO_LOSSES:
            raise ConfigError(f"unknown DPO loss {loss!r}; choose one of {', '.join(DPO_LOSSES)}")
        self.model, self.beta, self.reference = model, beta, reference
        self.kind, self.label_smoothing, self.nll_weight = loss, label_smoothing, nll_weight
        if reference is not None:
            reference.requires_grad_(False).eval()

    @torch.no_grad()
    def reference_logprobs(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each row's completion log-probability under the reference, in eval mode (no dropout, no NEFTune)."""
        if self.reference is not None:
            return completion_logprobs(self.reference(x).logits, y)
        training = self.model.training
        self.model.eval()
        try:
            with adapters_off(self.model):
                return completion_logprobs(self.model(x).logits, y)
        finally:
            self.model.train(training)

    def loss(self, policy: nn.Module, x: torch.Tensor, y: torch.Tensor,
             context: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the pairs, the sums over them of [loss, ranked right, margin, chosen reward, rejected
        reward], detached) of rows x, y (chosen rows, then rejected); `policy` is the model's forward (DDP's, a
        compiled one), run under `context` (autocast) as the reference is."""
        with context or nullcontext():
            ref = self.reference_logprobs(x, y)
            logp = completion_logprobs(policy(x).logits, y)
        n = len(x) // 2
        logratio = logp - ref
        chosen, rejected = self.beta * logratio[:n], self.beta * logratio[n:]
        losses = self._pair_losses(chosen - rejected, logratio, y)
        if self.nll_weight:
            losses = losses - self.nll_weight * logp[:n].sum() / (y[:n] >= 0).sum().clamp(min=1)
        d = (chosen - rejected).detach()
        stats = torch.stack([losses.detach().sum(), (d > 0).float().sum(), d.sum(), chosen.detach().sum(),
                             rejected.detach().sum()])
        return losses.mean(), stats

    def _pair_losses(self, margin: torch.Tensor, logratio: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each pair's loss, of its rewards' margin (ipo: of its sides' per-token log-ratios instead)."""
        if self.kind == "sigmoid":
            return -F.logsigmoid(margin)
        if self.kind == "hinge":
            return F.relu(1 - margin)
        if self.kind == "robust":
            eps = self.label_smoothing
            return (-(1 - eps) * F.logsigmoid(margin) + eps * F.logsigmoid(-margin)) / (1 - 2 * eps)
        per_token = logratio / (y >= 0).sum(1).clamp(min=1)
        n = len(per_token) // 2
        return (per_token[:n] - per_token[n:] - 1 / (2 * self.beta)) ** 2

    def evaluate(self, tokens: np.ndarray, mask: np.ndarray, starts: np.ndarray, batch_size: int, block_size: int,
                 max_batches: int | None, context: Any = None) -> PreferenceResult:
        """The first max_batches · batch_size pairs of a split (all, if None), in order, with the model in eval mode:
        the same pairs every time."""
        begin, end = pair_windows(starts, len(tokens), block_size)
        n_pairs = len(begin) // 2
        if max_batches is not None:
            n_pairs = min(n_pairs, max_batches * batch_size)
        training = self.model.training
        self.model.eval()
        totals = torch.zeros(5, dtype=torch.float64)
        device = next(self.model.parameters()).device
        try:
            with torch.no_grad():
                for i in range(0, n_pairs, batch_size):
                    x, y = pair_batch(tokens, mask, begin, end, np.arange(i, min(i + batch_size, n_pairs)))
                    totals += self.loss(self.model, x.to(device), y.to(device), context)[1].double().cpu()
        finally:
            self.model.train(training)
        return PreferenceResult(*(totals / n_pairs).tolist(), pairs=n_pairs)
