"""Long-range dependencies: a Transformer and an LSTM of matched size trained on the synthetic tasks of `synthetic`,
then scored on the answer tokens at each distance (`tlm experiment long-range`).

Attention reaches any earlier position in one step, whatever the distance; a recurrent model must carry everything it
may be asked about in a fixed-size state, through every step in between. So the Transformer's accuracy should stay
flat with distance while the LSTM's falls toward chance once what it must hold outgrows its state.

Training is a compact loop over freshly generated batches rather than `train()`: the tasks have no corpus to prepare
(every batch is new, so there is nothing to overfit or hold out), the loss counts the answer tokens only (targets -1
elsewhere), and no run folder is needed. It uses the trainer's optimizer and schedule (`optim.make_optimizer`,
`lr_at`: AdamW, warmup, cosine decay) and gradient clipping, and the models come from `build_model`, as in training.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..accounting import count_params, match_params
from ..config import ModelConfig, TrainConfig, check_types, check_unique
from ..errors import ConfigError
from ..model import build_model
from ..optim import lr_at, make_optimizer, set_lr
from ..runtime import environment, resolve_device
from .plotting import figure, save_png
from .synthetic import AssociativeRecall, Copy, Task

log = logging.getLogger(__name__)

ARCHS = ("transformer", "lstm")
TASKS = ("recall", "copy")


@dataclass
class TaskResult:
    task: str
    arch: str
    params: int
    non_embedding_params: int
    n_layer: int
    n_embd: int
    steps: int
    train_seconds: float
    final_loss: float
    """Mean loss on the answer tokens over the last 50 training steps."""
    chance: float
    accuracy: dict[int, float] = field(default_factory=dict)
    """Accuracy on the answer tokens, by distance."""


@dataclass
class LongRangeConfig:
    """What `tlm experiment long-range` trains and measures."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """Tasks: recall (associative recall), copy."""
    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    """Architectures: transformer, lstm, rnn; the recurrent ones are matched to the Transformer's non-embedding size."""
    recall_length: int = 32
    """Recall: the most symbols per sequence (at least 2), each but the last asked once (answers stand 2 to
    2·recall_length - 2 tokens back)."""
    copy_length: int = 32
    """Copy: the longest sequence copied (answers stand 1 to copy_length tokens back)."""
    n_layer: int = 2
    """Layers of every model."""
    n_embd: int = 64
    """Width of the Transformer."""
    n_head: int = 2
    """Attention heads of the Transformer. Two of 32 dimensions rather than four of 16: rotary positions leave only a
    head's slowly turning dimensions to match content across the sequence, and in trials of recall's layouts here
    four heads learned it fully in 3 of 4 runs at recall_lr (1 of 5 at 3e-3), two heads in 10 of 10 (each at least
    94 % at every distance). Copy learns with either."""
    steps: int = 1500
    """Training steps per model, each on a fresh batch."""
    batch_size: int = 32
    """Sequences per step."""
    recall_lr: float = 1e-3
    """Recall: peak learning rate (warmup, then cosine decay to a tenth), for both architectures. Recall needs the
    lower rate: at 2e-3 and 3e-3 the Transformer stayed at chance through 1,500 steps in 1 of 3 and 1 of 2 seeds,
    at 1e-3 in none of 10. The LSTM stays at chance at 1e-3 and 3e-3 alike."""
    copy_lr: float = 3e-3
    """Copy: peak learning rate, for both architectures. Copy needs the higher rate: at 1e-3 the Transformer
    reached only 24 % at distance 32 in 1,500 steps (2 of 2 seeds), at 2e-3 and 3e-3 100 %."""
    eval_distances: int = 8
    """Distances evaluated, spread over each task's range."""
    eval_answers: int = 512
    """Answers scored per distance."""
    seed: int = 0
    """Seed of the weights, the training data and (offset) the evaluation data."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""

    def __post_init__(self) -> None:
        check_types(self, "long_range")  # finite numbers, a seed torch takes
        for name, values in (("tasks", self.tasks), ("archs", self.archs)):  # it said "unknown task(s) ... []"
            if not values:
                raise ConfigError(f"{name} is empty; tasks: {', '.join(TASKS)}; architectures: transformer, lstm, rnn")
        bad = sorted(set(self.tasks) - set(TASKS)) + sorted(set(self.archs) - {"transformer", "lstm", "rnn"})
        if bad:
            raise ConfigError(f"unknown task(s) or architecture(s) {bad}; tasks: {', '.join(TASKS)}; architectures: "
                              "transformer, lstm, rnn")
        check_unique("tasks", self.tasks)
        check_unique("archs", self.archs)
        if min(self.steps, self.batch_size, self.eval_distances, self.eval_answers, self.recall_length,
               self.copy_length, self.n_layer, self.n_embd, self.n_head) < 1:
            raise ConfigError("steps, batch_size, eval_distances, eval_answers, recall_length, copy_length, n_layer, "
                              "n_embd and n_head must be >= 1")
        if not (self.recall_lr > 0 and self.copy_lr > 0):
            raise ConfigError(f"recall_lr and copy_lr must be > 0, got {self.recall_lr} and {self.copy_lr}")
        if "recall" in self.tasks and self.recall_length < 2:
            raise ConfigError(f"recall_length must be >= 2 (one symbol is asked nothing), got {self.recall_length}")
        for name in self.tasks:  # every task and model is valid before the first trains, not after it
            self.transformer(self.task(name))

    def task(self, name: str) -> Task:
        """The task called `name` at this size."""
        if name == "recall":
            return AssociativeRecall(length=self.recall_length, n_symbols=2 * self.recall_length)
        return Copy(length=self.copy_length, n_symbols=2 * self.copy_length)

    def lr(self, name: str) -> float:
        """The peak learning rate of the task called `name`."""
        return self.recall_lr if name == "recall" else self.copy_lr

    def transformer(self, task: Task) -> ModelConfig:
        """A Transformer with rotary positions over the task's length. Rotary, because one relative pattern ("the
        token after the one I match") then serves every position: with learned positions the Transformer reached
        79 % copy accuracy at distance 32 in 1,200 steps, with rotary 100 %."""
        return ModelConfig(vocab_size=task.vocab_size, block_size=task.seq_len, n_layer=self.n_layer,
                           n_embd=self.n_embd, n_head=self.n_head, pos_encoding="rope")

    def model_configs(self, task: Task) -> dict[str, ModelConfig]:
        """The Transformer (`transformer`) and recurrent models of matched non-embedding size."""
        transformer = self.transformer(task)
        return {a: transformer if a == "transformer" else match_params(transformer, a) for a in self.archs}


def train_on_task(model: torch.nn.Module, task: Task, steps: int, batch_size: int, lr: float, seed: int,
                  device: torch.device, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train on fresh batches for `steps` steps; -> the loss of every step (answer tokens only)."""
    cfg = TrainConfig(max_iters=steps, lr=lr, warmup_iters=min(100, steps // 10), weight_decay=0.0, seed=seed)
    optimizer = make_optimizer(model, cfg, device)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        set_lr(optimizer, lr_at(step, step / max(1, steps - 1), cfg))
        batch = task.sample(batch_size, gen)
        loss = model(batch.ids.to(device), batch.targets.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


EVAL_ROWS = 4096
"""Sequences scored per forward pass in accuracy_by_distance."""


@torch.no_grad()
def accuracy_by_distance(model: torch.nn.Module, task: Task, distances: Sequence[int], n_answers: int, seed: int,
                         device: torch.device) -> dict[int, float]:
    """Greedy accuracy on the answers standing exactly d back, for each d: about `n_answers` of them, in sequences
    sampled with that distance from a generator seeded apart from training's, EVAL_ROWS sequences at a time (so
    memory stays bounded however many answers are asked for)."""
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    model.eval()
    out = {}
    for d in distances:
        per_row = float((task.sample(16, gen, d).distance == d).sum()) / 16
        rows, right, scored_total = max(1, math.ceil(n_answers / per_row)), 0, 0
        while rows > 0:
            batch = task.sample(min(rows, EVAL_ROWS), gen, d)
            rows -= batch.ids.size(0)
            predicted = model(batch.ids.to(device)).logits.argmax(dim=-1).cpu()
            scored = batch.distance == d
            right += int((predicted[scored] == batch.targets[scored]).sum())
            scored_total += int(scored.sum())
        out[d] = right / scored_total if scored_total else float("nan")
    return out


def pick_distances(task: Task, count: int) -> list[int]:
    """About `count` distances spread evenly over the task's range, both ends included."""
    valid = task.distances()
    if count >= len(valid):
        return valid
    return sorted({valid[round(i * (len(valid) - 1) / (count - 1))] for i in range(count)}) if count > 1 else valid[-1:]


def run_long_range(cfg: LongRangeConfig, out: str | Path,
                   on_step: Callable[[str, str, int, float], None] | None = None
                   ) -> tuple[list[TaskResult], dict[str, Path]]:
    """Train each architecture on each task and score it by distance; write long_range.csv, long_range.json and
    long_range.png (accuracy against distance, one panel per task) into `out`; -> the results and files."""
    Path(out).mkdir(parents=True, exist_ok=True)  # before training: an --out the system refuses fails at once
    dev = resolve_device(cfg.device)
    results = []
    for name in cfg.tasks:
        task = cfg.task(name)
        distances = pick_distances(task, cfg.eval_distances)
        for arch, config in cfg.model_configs(task).items():
            torch.manual_seed(cfg.seed)
            model = build_model(config).to(dev).init_weights(cfg.seed)
            t0 = time.perf_counter()
            report = None if on_step is None else (lambda s, v, n=name, a=arch: on_step(n, a, s, v))
            losses = train_on_task(model, task, cfg.steps, cfg.batch_size, cfg.lr(name), cfg.seed, dev, report)
            seconds = time.perf_counter() - t0
            acc = accuracy_by_distance(model, task, distances, cfg.eval_answers, cfg.seed, dev)
            tail = losses[-50:]
            p = count_params(config)
            results.append(TaskResult(name, arch, p.total, p.non_embedding, config.n_layer, config.n_embd, cfg.steps,
                                      seconds, sum(tail) / len(tail), task.chance, acc))
            log.info("%s %s: %.1fs, accuracy by distance %s", name, arch, seconds, acc)
    settings = {**asdict(cfg), "resolved_device": str(dev), "threads": torch.get_num_threads()}
    return results, write_results(results, Path(out), settings)


def write_results(results: Sequence[TaskResult], out: Path, settings: dict[str, Any]) -> dict[str, Path]:
    """long_range.csv (one row per task, architecture and distance), long_range.json and long_range.png."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "long_range.csv", "json": out / "long_range.json", "png": out / "long_range.png"}
    with open(files["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "arch", "distance", "accuracy", "chance", "params", "non_embedding_params", "n_layer",
                    "n_embd", "steps", "train_seconds"])
        for r in results:
            for d, a in r.accuracy.items():
                w.writerow([r.task, r.arch, d, f"{a:.4f}", f"{r.chance:.4f}", r.params, r.non_embedding_params,
                            r.n_layer, r.n_embd, r.steps, f"{r.train_seconds:.1f}"])
    summary = {"experiment": "long-range", "settings": settings, "environment": environment(),
               "results": [asdict(r) for r in results]}
    files["json"].write_text(json.dumps(summary, indent=2))
    plot(results, files["png"])
    return files


def plot(results: Sequence[TaskResult], path: Path) -> Path:
    """Accuracy against distance, one panel per task, one line per architecture, chance dashed."""
    tasks = list(dict.fromkeys(r.task for r in results))
    fig = figure(5.0 * len(tasks), 3.8)
    for i, name in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        rows = [r for r in results if r.task == name]
        for r in rows:
            ax.plot(list(r.accuracy), list(r.accuracy.values()), "o-",
                    label=f"{r.arch} ({r.non_embedding_params / 1e3:.0f}K params)")
        ax.axhline(rows[0].chance, color="gray", linestyle="--", linewidth=1, label="chance")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("distance to the answer's source (tokens)")
        ax.set_ylabel("accuracy on answer tokens")
        ax.set_title({"recall": "associative recall", "copy": "copy"}.get(name, name))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_png(fig, path)


def render_table(results: Sequence[TaskResult]) -> str:
    """Accuracy by distance, one row per task and architecture."""
    lines = []
    for name in dict.fromkeys(r.task for r in results):
        rows = [r for r in results if r.task == name]
        ds = list(rows[0].accuracy)
        lines.append(f"{name} (chance {rows[0].chance:.3f}): accuracy on answer tokens by distance")
        lines.append(f"{'arch':<12}{'params':>9}{'train s':>9}{'loss':>8}  " + "".join(f"{d:>7}" for d in ds))
        for r in rows:
            lines.append(f"{r.arch:<12}{r.non_embedding_params:>9,}{r.train_seconds:>9.1f}{r.final_loss:>8.3f}  "
                         + "".join(f"{r.accuracy[d]:>7.1%}" for d in ds))
        lines.append("")
    return "\n".join(lines).rstrip()
