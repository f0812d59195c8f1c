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
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..accounting import count_params, match_params
from ..config import ModelConfig, TrainConfig
from ..errors import ConfigError
from ..model import build_model
from ..optim import lr_at, make_optimizer, set_lr
from ..runtime import environment, resolve_device
from .plotting import figure, save_png
from .synthetic import AssociativeRecall, Copy, Task

log = logging.getLogger(__name__)

ARCHS = ("transformer", "lstm")


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


def make_task(name: str, n_pairs: int, n_queries: int, copy_length: int) -> Task:
    """The task called `name` (recall or copy) at the given size."""
    if name == "recall":
        return AssociativeRecall(n_pairs=n_pairs, n_queries=n_queries, n_keys=2 * n_pairs, n_values=16)
    if name == "copy":
        return Copy(length=copy_length, n_symbols=2 * copy_length, min_length=1)
    raise ConfigError(f"unknown long-range task {name!r}; choose recall or copy")


def model_configs(task: Task, n_layer: int, n_embd: int, n_head: int, archs: Sequence[str]) -> dict[str, ModelConfig]:
    """A Transformer (learned positions over the task's length) and recurrent models of matched non-embedding size."""
    transformer = ModelConfig(vocab_size=task.vocab_size, block_size=task.seq_len, n_layer=n_layer, n_embd=n_embd,
                              n_head=n_head)
    return {arch: transformer if arch == "transformer" else match_params(transformer, arch) for arch in archs}


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
        losses.append(float(loss))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


@torch.no_grad()
def accuracy_by_distance(model: torch.nn.Module, task: Task, distances: Sequence[int], n_answers: int, seed: int,
                         device: torch.device) -> dict[int, float]:
    """Greedy accuracy on the answer tokens of sequences whose every answer stands exactly d back, for each d;
    about `n_answers` answers per distance, from a generator seeded apart from training's."""
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    model.eval()
    out = {}
    for d in distances:
        per_row = int((task.sample(1, gen, d).targets >= 0).sum())
        batch = task.sample(max(1, -(-n_answers // per_row)), gen, d)
        logits = model(batch.ids.to(device)).logits
        answered = batch.targets >= 0
        correct = logits.argmax(-1).cpu()[answered] == batch.targets[answered]
        out[d] = float(correct.float().mean())
    return out


def pick_distances(task: Task, count: int) -> list[int]:
    """About `count` distances spread evenly over the task's range, both ends included."""
    valid = task.distances()
    if count >= len(valid):
        return valid
    return sorted({valid[round(i * (len(valid) - 1) / (count - 1))] for i in range(count)}) if count > 1 else valid[-1:]


def run_long_range(out: str | Path, tasks: Sequence[str] = ("recall", "copy"), archs: Sequence[str] = ARCHS,
                   n_pairs: int = 32, n_queries: int = 8, copy_length: int = 32, n_layer: int = 2, n_embd: int = 64,
                   n_head: int = 4, steps: int = 1500, batch_size: int = 32, lr: float = 3e-3,
                   eval_distances: int = 8, eval_answers: int = 512, seed: int = 0, device: str = "auto",
                   on_step: Callable[[str, str, int, float], None] | None = None) -> list[TaskResult]:
    """Train each architecture on each task and score it by distance; write long_range.csv, long_range.json and
    long_range.png (accuracy against distance, one panel per task) into `out`."""
    for arch in archs:
        if arch not in ("transformer", "lstm", "rnn"):
            raise ConfigError(f"unknown architecture {arch!r}; choose among transformer, lstm, rnn")
    dev = resolve_device(device)
    results = []
    for name in tasks:
        task = make_task(name, n_pairs, n_queries, copy_length)
        distances = pick_distances(task, eval_distances)
        for arch, config in model_configs(task, n_layer, n_embd, n_head, archs).items():
            torch.manual_seed(seed)
            model = build_model(config).to(dev).init_weights(seed)
            t0 = time.perf_counter()
            losses = train_on_task(model, task, steps, batch_size, lr, seed, dev,
                                   None if on_step is None else lambda s, v, n=name, a=arch: on_step(n, a, s, v))
            seconds = time.perf_counter() - t0
            acc = accuracy_by_distance(model, task, distances, eval_answers, seed, dev)
            tail = losses[-50:]
            p = count_params(config)
            results.append(TaskResult(name, arch, p.total, p.non_embedding, config.n_layer, config.n_embd, steps,
                                      seconds, sum(tail) / len(tail), task.chance, acc))
            log.info("%s %s: %.1fs, accuracy by distance %s", name, arch, seconds, acc)
    write_results(results, Path(out), {"tasks": list(tasks), "archs": list(archs), "n_pairs": n_pairs,
                                       "n_queries": n_queries, "copy_length": copy_length, "n_layer": n_layer,
                                       "n_embd": n_embd, "n_head": n_head, "steps": steps, "batch_size": batch_size,
                                       "lr": lr, "seed": seed, "device": str(dev)})
    return results


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
    files["json"].write_text(json.dumps({"settings": settings, "environment": environment(),
                                         "results": [asdict(r) for r in results]}, indent=2))
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
