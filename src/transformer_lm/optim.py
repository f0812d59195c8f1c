"""Optimizers and learning-rate schedules.

AdamW (decay on hidden matrices only) is the default; Muon (Jordan et al. 2024; `torch.optim.Muon`'s update, batched by
shape in BatchedMuon) orthogonalizes the momentum of the 2-D weights inside the network and leaves embeddings, the LM
head, biases and gains to AdamW, as its authors prescribe. Both share one schedule: each parameter group carries an
`lr_scale`, and the loop sets `lr = schedule(step) * lr_scale` on every group.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .config import TrainConfig
from .errors import CheckpointError, ConfigError


def _param_roles(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters by role, each listed once (a tied head is its embedding): hidden matrices, the untied LM head's
    matrix, embedding tables, and vectors (biases, gains)."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = getattr(model, "lm_head", None)
    head_ids = {id(p) for p in head.parameters()} - embeddings if head is not None else set()
    roles: dict[str, list[nn.Parameter]] = {"hidden": [], "head": [], "embeddings": [], "vectors": []}
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            role = ("vectors" if p.dim() < 2 else "embeddings" if id(p) in embeddings else
                    "head" if id(p) in head_ids else "hidden")
            roles[role].append(p)
    return roles


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """The quintic Newton–Schulz orthogonalization of torch.optim.Muon (its coefficients, bfloat16 arithmetic, the
    wide orientation), applied to a stack of same-shape matrices (n, rows, cols) at once."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


# torch < 2.9 has no Muon; make_optimizer refuses the option there, so the class only needs to exist.
_Muon = getattr(torch.optim, "Muon", torch.optim.Optimizer)


class BatchedMuon(_Muon):
    """torch.optim.Muon (same update, hyperparameters and state) with the Newton–Schulz iterations of all same-shape
    matrices run as one batched chain, and momentum and decay as foreach ops. torch's step runs 15 small products
    per matrix, one matrix at a time: on the speedrun preset (16 matrices of 128 × 128 to 384 × 128) that was 28 % of
    a CPU training step, bound by per-call overhead, not arithmetic."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("BatchedMuon.step does not take a closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            momentum, lr = group["momentum"], group["lr"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            by_shape: dict[torch.Size, list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                by_shape[p.shape].append(i)
            for shape, idx in by_shape.items():
                ortho = newton_schulz(torch.stack([updates[i] for i in idx]), group["ns_coefficients"],
                                      group["ns_steps"], group["eps"])
                rows, cols = shape
                scale = math.sqrt(max(1.0, rows / cols))  # torch.optim.Muon's default ("original") adjustment
                torch._foreach_add_([params[i] for i in idx], list(ortho.to(params[idx[0]].dtype).unbind(0)),
                                    alpha=-lr * scale)


class MuonAdamW:
    """Muon on the hidden matrices and AdamW on the rest, driven as one optimizer: `param_groups` are the two
    optimizers' own group dicts (so setting a group's lr reaches it), and `state_dict()` has the standard single
    optimizer layout (parameters numbered in `param_groups` order), so checkpoints, resume and the whole-state helpers
    of `parallel` treat it like any torch optimizer."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.parts = (muon, adamw)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # read anew: load_state_dict replaces the parts' group dicts
        return [g for opt in self.parts for g in opt.param_groups]

    @property
    def state(self) -> dict[Any, Any]:
        return {k: v for opt in self.parts for k, v in opt.state.items()}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("MuonAdamW.step does not take a closure")
        for opt in self.parts:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": {}, "param_groups": []}
        offset = 0
        for opt in self.parts:
            sd = opt.state_dict()
            out["state"].update({int(k) + offset: v for k, v in sd["state"].items()})
            out["param_groups"] += [{**g, "params": [i + offset for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return out

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        offset, first = 0, 0
        state = {int(k): v for k, v in sd["state"].items()}
        for opt in self.parts:
            groups = sd["param_groups"][first:first + len(opt.param_groups)]
            ids = [i for g in groups for i in g["params"]]
            opt.load_state_dict({"state": {i - offset: state[i] for i in ids if i in state},
                                 "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in groups]})
            offset += len(ids)
            first += len(groups)


def fused_adamw(device: torch.device) -> bool:
    """Whether AdamW's fused kernel serves `device` (CUDA, and CPU since torch 2.4): the fastest AdamW, on this
    project's 2-core CPU 0.24 s per step at GPT-2's 124M parameters against 1.05 s for foreach, the fast path
    everywhere else."""
    return device.type in ("cuda", "cpu")


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer | MuonAdamW:
    """`cfg.optimizer`: adamw — weight decay on the matrices of linear layers, none on embeddings, biases and gains;
    muon — Muon (peak lr `cfg.muon_lr`) on the hidden matrices, AdamW (peak lr `cfg.lr`) on the embeddings, an
    untied LM head, biases and gains."""
    roles = _param_roles(model)
    # FSDP2's sharded (DTensor) parameters keep foreach: with the fused kernel, the gloo exit abort that
    # parallel.leave sidesteps for `tlm train` (not for a script of the user's calling train()) was far more frequent:
    # 2-rank CPU runs aborted in 1 launch of 4-30 against 1 in 20-150 with foreach.
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    fused = fused_adamw(device) and not sharded
    adamw_kw = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "fused": fused, "foreach": not fused}
    rest = {"params": roles["embeddings"] + roles["vectors"], "weight_decay": 0.0, "lr_scale": 1.0}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW([{"params": roles["hidden"] + roles["head"], "weight_decay": cfg.weight_decay,
                                   "lr_scale": 1.0}, rest], **adamw_kw)
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"train.optimizer=muon needs torch >= 2.9 (this is {torch.__version__}); upgrade torch or "
                          "use --train.optimizer adamw")
    muon = BatchedMuon([{"params": roles["hidden"], "lr_scale": cfg.muon_lr / cfg.lr}], lr=cfg.muon_lr,
                       weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum)
    head = [{"params": roles["head"], "weight_decay": cfg.weight_decay, "lr_scale": 1.0}] if roles["head"] else []
    adamw = torch.optim.AdamW([*head, rest], **adamw_kw)
    return MuonAdamW(muon, adamw)


def _kind(groups: list[dict[str, Any]]) -> str:
    """The train.optimizer that made these parameter groups: Muon's groups alone carry `ns_steps`."""
    return "muon" if any("ns_steps" in g for g in groups) else "adamw"


def check_optimizer_state(optimizer: torch.optim.Optimizer | MuonAdamW, sd: dict[str, Any]) -> None:
    """Raise CheckpointError unless the saved optimizer state `sd` comes from an optimizer of this one's kind with
    groups of the same sizes. torch's load_state_dict compares only the sizes: a run resumed with another
    --train.optimizer loaded AdamW's moments into Muon's group unnoticed (a tied head gives both two groups of the
    same sizes), or ended in a KeyError traceback ('step') from Muon's state loaded into AdamW."""
    saved, ours = _kind(sd["param_groups"]), _kind(optimizer.param_groups)
    if saved != ours:
        raise CheckpointError(f"the checkpoint holds {saved} optimizer state, and this run would train with {ours}; "
                              f"resume with --train.optimizer {saved}, or start a new run to change the optimizer")
    if [len(g["params"]) for g in sd["param_groups"]] != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError("the checkpoint's optimizer state does not fit this model's parameter groups; resume "
                              "it with the config saved beside it")


@contextmanager
def config_hyperparameters(optimizer: torch.optim.Optimizer | MuonAdamW) -> Iterator[None]:
    """Load a checkpoint's optimizer state inside: its moments are kept, but every group's hyperparameters (betas,
    weight decay, Muon's momentum and lr scale, ...) return to the values this run's config gave them, which
    load_state_dict would otherwise replace with the saved run's, so that a resumed run's --train.* flags apply."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    yield
    for group, kept in zip(optimizer.param_groups, settings, strict=True):
        group.update(kept)


def set_lr(optimizer: torch.optim.Optimizer | MuonAdamW, lr: float) -> None:
    """Set every group's learning rate to the schedule's value times the group's own scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup_iters` steps, then, as the run's `progress` goes 0 → 1, from lr to lr·min_lr_ratio:
    cosine — a cosine decay over the rest of the run; wsd — warmup–stable–decay: constant, then a linear cooldown over
    the last `cooldown_fraction` of the budget after warmup; constant — no decay."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    progress = min(max(progress, 0.0), 1.0)
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)
    if cfg.schedule == "wsd":
        if progress <= 1.0 - cfg.cooldown_fraction:
            return cfg.lr
        # measured from the end, so that progress 1 gives min_lr exactly: from the start (1 - fraction, rounded) the
        # ratio could pass 1 and take the last step below the floor (-2e-19 with min_lr 0 and a fraction of 0.3)
        return min_lr + (cfg.lr - min_lr) * (1.0 - progress) / cfg.cooldown_fraction
    return cfg.lr
