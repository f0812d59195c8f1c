"""Scaling laws on one machine: train a ladder of model sizes on the same data with the real trainer (`train.train`,
so every rung is an ordinary run folder), then fit L(N) = E + A·N^(−α) to the final validation losses (Kaplan et al.
2020, "Scaling Laws for Neural Language Models"; the irreducible term E as in Hoffmann et al. 2022) and the same form
L(C) to the loss-vs-compute frontier.

Each rung's hyperparameters follow one rule, never per-size tuning:

- shape: n_layer × n_embd from the rung ("4x128"), n_head = n_embd / head_dim;
- learning rate ∝ 1/width, lr = base_lr · base_width / n_embd (µP's rule for Adam on hidden matrices, applied to the
  whole model for simplicity);
- batch size, context, schedule (linear warmup over a fixed fraction of the steps, then cosine decay to 10 %),
  weight decay and clipping: the same for every rung;
- tokens: the same budget D for every rung, or with `compute` set, D = C / (the rung's training FLOPs per token), so
  every rung spends the same compute.

N is Kaplan's non-embedding parameter count (`accounting.count_params`). Compute is C = training FLOPs per token
(`accounting.flops_per_token`: 6 × every matmul weight, LM head included, plus the attention matmuls) × tokens; at
these small widths the attention and the head are a large share, which 6·N·D would miss. The frontier is the lower
envelope of every rung's validation curve against compute (Kaplan's Figure 1): points from inside a run, with the
learning-rate schedule not yet finished, so it is a slight overestimate of what a run sized for that compute reaches.

The fit needs no SciPy: for each candidate E on a grid below min(L), log(L − E) = log A − α·log N is a straight line
(least squares); the E whose line gives the smallest squared error in L starts a Levenberg–Marquardt refinement of
(E, log A, α), also in L. E is kept ≥ 0 (a loss is) and α in [0, ALPHA_MAX]; losses that do not fall with size (an
undertrained large rung) drive α to a bound, and the fit is refused rather than reported. R² = 1 − SS_res / SS_tot,
in L.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..accounting import count_params, flops_per_token
from ..config import ModelConfig, TrainConfig, check_types, dump_json
from ..data import PreparedData
from ..errors import ConfigError, DataError, RunExistsError
from ..train import read_metrics, train
from .plotting import figure, save_png

log = logging.getLogger(__name__)

DEFAULT_LADDER = ["2x32", "2x64", "3x96", "4x128", "5x160", "6x192"]
"""25k to 2.7M non-embedding parameters (2.0 decades); about 20 min for 2M tokens a rung on 2 CPU cores."""
ALPHA_MAX = 5.0
"""The largest exponent a fit may take: published ones are 0.05-0.5 (Kaplan α_N ≈ 0.076, Hoffmann's 0.34); one at
this bound means the points are not a falling power law (and A = A'·scale^α would overflow a float soon after)."""


# The fit


@dataclass(frozen=True)
class PowerLawFit:
    """L(x) = E + A·x^(−α), fitted by least squares in L."""

    E: float
    A: float
    alpha: float
    r2: float
    """Coefficient of determination in L: 1 − SS_res / SS_tot."""
    points: int

    def predict(self, x: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A * np.power(x, -self.alpha)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def formula(self, var: str) -> str:
        return f"L({var}) = {self.E:.3f} + {self.A:.4g}·{var}^{-self.alpha:.3f}  (R² = {self.r2:.3f})"


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    """1 − SS_res / SS_tot (1.0 for a perfect fit; SS_tot = 0 counts as perfect only when the residuals are 0)."""
    y, predicted = np.asarray(y, float), np.asarray(predicted, float)
    ss_res = float(np.sum((y - predicted) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def fit_power_law(x: Any, y: Any, iters: int = 200) -> PowerLawFit:
    """Least-squares fit of y = E + A·x^(−α) with E ≥ 0 and 0 ≤ α ≤ ALPHA_MAX (method: module docstring). Needs ≥ 3
    distinct x > 0; raises DataError when y does not fall with x as a power law (the best α is at a bound)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise DataError(f"a power-law fit needs at least 3 (x, y) pairs, got x {x.shape} and y {y.shape}; add rungs")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise DataError("a power-law fit needs finite positive losses and positive sizes")
    if len(np.unique(x)) < 3:  # E, A and α: through two sizes any number of curves fit equally well
        raise DataError(f"a power-law fit needs at least 3 distinct sizes, got {np.unique(x).tolist()}; add rungs")
    scale = math.exp(float(np.mean(np.log(x))))  # fit in u = x / scale, where A is O(y) and well conditioned
    log_u = np.log(x / scale)
    floor = float(y.min())

    def sse(p: np.ndarray) -> float:
        return float(np.sum((p[0] + np.exp(p[1] - p[2] * log_u) - y) ** 2))

    best = None
    for E in floor * (1 - np.geomspace(1e-6, 1.0, 400)):  # from just below min(L) down to 0
        slope, intercept = np.polyfit(log_u, np.log(y - E), 1)
        p = np.array([E, intercept, np.clip(-slope, 0.0, ALPHA_MAX)])
        if best is None or sse(p) < sse(best):
            best = p
    p, lam = best, 1e-3
    for _ in range(iters):  # Levenberg–Marquardt on (E, log A', α)
        g = np.exp(p[1] - p[2] * log_u)
        r = p[0] + g - y
        J = np.stack([np.ones_like(g), g, -g * log_u], axis=1)
        H, grad = J.T @ J, J.T @ r
        improved = False
        while lam < 1e12:
            q = p - np.linalg.solve(H + lam * np.diag(np.diag(H) + 1e-12), grad)
            q[0], q[2] = max(q[0], 0.0), min(max(q[2], 0.0), ALPHA_MAX)
            if sse(q) < sse(p):
                improved = sse(p) - sse(q) > 1e-15 * max(sse(p), 1e-300)
                p, lam = q, lam / 3
                break
            lam *= 4
        if not improved:
            break
    E, alpha = float(p[0]), float(p[2])
    if not 1e-6 < alpha < ALPHA_MAX - 1e-6:
        raise DataError(f"the losses {np.round(y, 4).tolist()} do not fall as a power law of x (the best exponent "
                        f"is at its bound {round(alpha, 3) + 0.0:g}); train the rungs longer or add smaller ones")
    A = float(math.exp(p[1] + alpha * math.log(scale)))  # A'·(x/scale)^−α = A'·scale^α·x^−α
    return PowerLawFit(E, A, alpha, r_squared(y, E + A * x**-alpha), len(x))


# The sweep


@dataclass
class ScalingConfig:
    """A scaling-law sweep: the ladder of model sizes, each rung's budget, and the rule for its hyperparameters."""

    sizes: list[str] = field(default_factory=lambda: list(DEFAULT_LADDER))
    """Rungs as "LAYERSxWIDTH" (n_layer x n_embd), e.g. [2x32, 4x128]; widths must be multiples of head_dim."""
    tokens: float = 2e6
    """Training tokens of every rung (a fixed budget), unless `compute` is set."""
    compute: float | None = None
    """Compute-matched sweep: training FLOPs of every rung; a rung's tokens = compute / its FLOPs per token."""
    block_size: int = 128
    """Context of every rung."""
    batch_size: int = 16
    """Sequences per step, every rung."""
    head_dim: int = 32
    """Width of an attention head; n_head = n_embd / head_dim."""
    base_lr: float = 2e-3
    """Learning rate at width base_width; a rung of width n_embd uses base_lr · base_width / n_embd."""
    base_width: int = 128
    """The width at which base_lr applies."""
    warmup_fraction: float = 0.05
    """Linear warmup over this fraction of each rung's steps, then cosine decay to 10 % of the peak."""
    evals: int = 8
    """Validation passes per rung, every steps // evals steps, plus one at the last step (the points of the
    loss-vs-compute frontier)."""
    eval_batches: int = 24
    """Validation batches per pass (the same start of the val split every time)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    seed: int = 1337
    """Seed of every rung (initialization and batch order)."""

    def __post_init__(self) -> None:
        check_types(self, "scaling")  # finite numbers, a seed torch takes
        if min(self.block_size, self.batch_size, self.head_dim, self.base_width, self.evals, self.eval_batches) < 1:
            raise ConfigError("block_size, batch_size, head_dim, base_width, evals and eval_batches must be >= 1")
        if not self.sizes:
            raise ConfigError("sizes is empty; give the rungs as LAYERSxWIDTH, e.g. --sizes '[2x32, 2x64, 4x64]'")
        self.rungs()  # validates the sizes
        if self.compute is None and not self.tokens > 0:
            raise ConfigError(f"tokens must be > 0, got {self.tokens}")
        if self.compute is not None and not self.compute > 0:
            raise ConfigError(f"compute must be > 0 FLOPs, got {self.compute}")
        if self.base_lr <= 0 or not 0 <= self.warmup_fraction < 1:
            raise ConfigError("base_lr must be > 0 and warmup_fraction in [0, 1)")

    def rungs(self) -> list[tuple[int, int]]:
        """(n_layer, n_embd) of each rung, in the order given."""
        out = []
        for spec in self.sizes:
            m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(spec))
            if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
                raise ConfigError(f"a rung is LAYERSxWIDTH such as 4x128, got {spec!r}")
            if int(m.group(2)) % self.head_dim:
                raise ConfigError(f"rung {spec}: width {m.group(2)} is not a multiple of head_dim {self.head_dim}")
            out.append((int(m.group(1)), int(m.group(2))))
        if len(set(out)) != len(out):
            raise ConfigError(f"the ladder repeats a rung: {self.sizes}")
        return out


@dataclass(frozen=True)
class RungPlan:
    """One rung's configs, as the rule sets them."""

    name: str
    model: ModelConfig
    train: TrainConfig


def plan_rungs(cfg: ScalingConfig, vocab_size: int) -> list[RungPlan]:
    """The ModelConfig and TrainConfig of every rung (the rule in the module docstring)."""
    tokens_per_step = cfg.batch_size * cfg.block_size
    models = [ModelConfig(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=n_layer,
                          n_head=n_embd // cfg.head_dim, n_embd=n_embd) for n_layer, n_embd in cfg.rungs()]
    # 5 whole steps of the costliest rung keep every rung within 10 % of the budget (the failing rung's 5 steps, named
    # before, could be too few for a costlier rung, and the budget suggested was then refused for that one)
    enough = 5 * tokens_per_step * max(flops_per_token(m)["train"] for m in models)
    plans = []
    for model in models:
        n_layer, n_embd = model.n_layer, model.n_embd
        fpt = flops_per_token(model)["train"]
        tokens = cfg.compute / fpt if cfg.compute is not None else cfg.tokens
        steps = max(1, round(tokens / tokens_per_step))
        if cfg.compute is not None and abs(steps * tokens_per_step * fpt / cfg.compute - 1) > 0.1:
            # whole steps: a budget of a few steps cannot be matched (1.5 steps rounds to 2, +33 %)
            raise ConfigError(f"rung {n_layer}x{n_embd} would spend {steps * tokens_per_step * fpt:.3g} FLOPs in "
                              f"{steps} whole step(s), more than 10 % off --compute {cfg.compute:.3g}; give "
                              f"--compute >= {enough:.3g} or a smaller batch_size or block_size")
        tcfg = TrainConfig(batch_size=cfg.batch_size, max_iters=steps, lr=cfg.base_lr * cfg.base_width / n_embd,
                           warmup_iters=max(1, round(cfg.warmup_fraction * steps)),
                           eval_interval=max(1, steps // cfg.evals), eval_batches=cfg.eval_batches,
                           log_interval=max(1, min(10, steps // 10)), device=cfg.device, seed=cfg.seed)
        plans.append(RungPlan(f"L{n_layer}-d{n_embd}", model, tcfg))
    return plans


@dataclass
class RungResult:
    """A finished rung: its size, budget and final validation loss (nats/token)."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    params: int
    non_embedding_params: int
    lr: float
    steps: int
    tokens: int
    flops_per_token: float
    """Training FLOPs per token (forward + backward)."""
    compute: float
    """flops_per_token × tokens."""
    val_loss: float
    val_bpb: float
    train_seconds: float
    """The training loop's own time (evaluation excluded), from metrics.jsonl."""
    tokens_per_s: float
    run_dir: str
    reused: bool
    """The run folder already held this finished rung, so it was read back instead of trained again."""


@dataclass
class ScalingResult:
    config: ScalingConfig
    rungs: list[RungResult]
    points: list[dict[str, Any]]
    """Every validation pass of every rung: rung, step, tokens, compute, val_loss, on_frontier."""
    fit_params: PowerLawFit | None
    """L(N) over the rungs' final losses (None with fewer than 3 rungs)."""
    fit_compute: PowerLawFit | None
    """L(C) over the frontier points (None with fewer than 3)."""
    wall_seconds: float
    fit_notes: dict[str, str | None] = field(default_factory=dict)
    """Why a fit is missing, by variable ("N", "C"): too few points, or losses that are not a falling power law."""
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"experiment": "scaling", "config": asdict(self.config),
                "fit_params": self.fit_params.to_dict() if self.fit_params else None,
                "fit_compute": self.fit_compute.to_dict() if self.fit_compute else None, "fit_notes": self.fit_notes,
                "decades_of_params": self.decades, "wall_seconds": self.wall_seconds,
                "rungs": [asdict(r) for r in self.rungs], "points": self.points,
                "files": {k: str(v) for k, v in self.files.items()}}

    @property
    def decades(self) -> float:
        n = [r.non_embedding_params for r in self.rungs]
        return math.log10(max(n) / min(n)) if n else 0.0


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """What makes two rungs the same: their config without the data's source as it was typed (corpus.txt,
    ./corpus.txt and /abs/corpus.txt are one corpus; the prepared folder and its fingerprint say what the data is)."""
    data = config.get("data")
    return {**config, "data": {k: v for k, v in data.items() if k != "source"} if isinstance(data, dict) else data}


def _rung_state(run_dir: Path, config: dict[str, Any], steps: int) -> str | None:
    """"finished" when the folder holds this exact rung (same model, training and data config) trained to its last
    step, "paused" when it holds it stopped earlier (Ctrl-C) with a checkpoint to resume from, "started" when it
    holds it stopped before its first checkpoint (killed, or a second Ctrl-C): nothing to keep, so it starts over;
    else None."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        records = read_metrics(run_dir / "metrics.jsonl")
    except (OSError, ValueError):
        return None
    if not (isinstance(saved, dict) and all(_identity(saved).get(k) == v for k, v in _identity(config).items())):
        return None
    if any(r.get("step") == steps and "val_loss" in r for r in records):
        return "finished"
    return "paused" if (run_dir / "checkpoints" / "latest").is_file() else "started"


def data_fingerprint(data: PreparedData) -> str:
    """A short hash of what the prepared folder holds (token counts, source files and sizes, tokenizer), so that a
    rung trained before the folder was prepared again from another corpus is not reused."""
    m = data.manifest
    key = [m.get("train_tokens"), m.get("val_tokens"), m.get("tokenizer"), m.get("sources"), m.get("val_fraction")]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def check_sweep(out: str | Path, cfg: ScalingConfig, overwrite: bool) -> None:
    """Refuse, before training, an `out` whose scaling.json is another sweep's (other sizes, budget or rule) unless
    `overwrite`: the same sweep run again reuses its finished rungs and rewrites its results in place."""
    try:
        saved = json.loads((Path(out) / "scaling.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    now = json.loads(json.dumps(asdict(cfg)))
    if isinstance(saved, dict) and saved != now and not overwrite:
        changed = ", ".join(f"{k} {saved.get(k)} there, {now.get(k)} now" for k in sorted(saved.keys() | now.keys())
                            if saved.get(k) != now.get(k))  # the settings that differ (it named only the sizes)
        raise RunExistsError(f"{out} holds the results of another scaling sweep ({changed}); pass --overwrite true "
                             "to replace them (finished identical rungs are still reused), or choose another --out")


def run_scaling(cfg: ScalingConfig, data: PreparedData, out: str | Path, overwrite: bool = False,
                progress: bool = True, data_label: str = "python-stdlib") -> ScalingResult:
    """Train every rung into `out`/runs/NAME (a finished identical rung is reused), fit, and write scaling.csv,
    scaling_points.csv, scaling.json, loss_vs_params.png and loss_vs_compute.png into `out`."""
    out = Path(out)
    check_sweep(out, cfg, overwrite)
    t0 = time.perf_counter()
    rungs, points = [], []
    for plan in plan_rungs(cfg, data.tokenizer.vocab_size):
        run_dir = out / "runs" / plan.name
        extra = {"data": {"source": data_label, "tokenizer": data.tokenizer.kind, "prepared": str(data.path),
                          "fingerprint": data_fingerprint(data)},
                 "scaling": {"rung": plan.name, "rule": "lr = base_lr * base_width / n_embd",
                             "base_lr": cfg.base_lr, "base_width": cfg.base_width}}
        config = {"model": plan.model.to_dict(), "train": json.loads(dump_json(plan.train)), **extra}
        state = _rung_state(run_dir, config, plan.train.max_iters)
        reused = state == "finished"
        if reused:
            log.info("rung %s: reusing the finished run in %s", plan.name, run_dir)
        else:
            log.info("rung %s: %d steps at lr %.3g%s", plan.name, plan.train.max_iters, plan.train.lr,
                     {"paused": ", resumed", "started": ", started again (stopped before its first checkpoint)"}
                     .get(state or "", ""))
            try:
                res = train(plan.model, plan.train, data, run_dir, resume=state == "paused",
                            overwrite=overwrite or state == "started", progress=progress, extra_config=extra)
            except RunExistsError as e:
                if not (run_dir / "config.json").is_file():
                    raise  # not another run: train's own reason (files tlm did not write, ...) is the one to give
                raise RunExistsError(f"{run_dir} holds another run than rung {plan.name} of this sweep; pass "
                                     "--overwrite true to retrain it, or choose another --out") from e
            if res.interrupted:  # Ctrl-C: the rung is checkpointed; the same command resumes it
                log.info("rung %s paused at step %d; run the same command again to continue the sweep",
                         plan.name, res.step)
                raise KeyboardInterrupt
        rungs.append(_rung_result(plan, run_dir, reused))
        fpt = rungs[-1].flops_per_token
        points += [{"rung": plan.name, "step": r["step"], "tokens": r["tokens"], "compute": fpt * r["tokens"],
                    "val_loss": r["val_loss"]}
                   for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]
    frontier = _mark_frontier(points)
    fits, notes = {}, {}
    for var, xs, ys in (("N", [r.non_embedding_params for r in rungs], [r.val_loss for r in rungs]),
                        ("C", [p["compute"] for p in frontier], [p["val_loss"] for p in frontier])):
        fits[var], notes[var] = None, "too few points to fit" if len(xs) < 3 else None
        if notes[var] is None:
            try:
                fits[var] = fit_power_law(xs, ys)
            except DataError as e:  # the trained rungs are kept and written; only the fit is withheld
                notes[var] = str(e)
                log.warning("no L(%s) fit: %s", var, e)
    result = ScalingResult(cfg, rungs, points, fits["N"], fits["C"], time.perf_counter() - t0, fit_notes=notes)
    write_results(result, out)
    return result


def _rung_result(plan: RungPlan, run_dir: Path, reused: bool) -> RungResult:
    records = read_metrics(run_dir / "metrics.jsonl")
    final = [r for r in records if "val_loss" in r][-1]
    model = ModelConfig.from_dict(json.loads((run_dir / "config.json").read_text())["model"])
    p = count_params(model)
    fpt = flops_per_token(model)["train"]
    return RungResult(plan.name, model.n_layer, model.n_embd, model.n_head, p.total, p.non_embedding, plan.train.lr,
                      final["step"], final["tokens"], fpt, fpt * final["tokens"], final["val_loss"], final["val_bpb"],
                      final["elapsed"], final["tokens"] / max(final["elapsed"], 1e-9), str(run_dir), reused)


def _mark_frontier(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flag (in place) and return the points no cheaper-or-equal point beats: the lower envelope in compute."""
    frontier, best = [], math.inf
    for p in sorted(points, key=lambda p: (p["compute"], p["val_loss"])):
        p["on_frontier"] = p["val_loss"] < best
        if p["on_frontier"]:
            frontier.append(p)
            best = p["val_loss"]
    return frontier


# Output


def write_results(result: ScalingResult, out: str | Path) -> dict[str, Path]:
    """scaling.csv (one row per rung), scaling_points.csv (every validation pass), both plots and scaling.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "scaling.csv", "points_csv": out / "scaling_points.csv",
             "params_png": plot_loss_vs_params(result, out / "loss_vs_params.png"),
             "compute_png": plot_loss_vs_compute(result, out / "loss_vs_compute.png"), "json": out / "scaling.json"}
    _write_csv(files["csv"], [asdict(r) for r in result.rungs])
    _write_csv(files["points_csv"], result.points)
    result.files = files
    files["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return files


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def _fit_curve(ax: Any, fit: PowerLawFit | None, xs: list[float], var: str) -> None:
    if fit is None:
        return
    grid = np.geomspace(min(xs) / 1.5, max(xs) * 1.5, 200)
    ax.plot(grid, fit.predict(grid), "--", color="black", linewidth=1, label=fit.formula(var))


def plot_loss_vs_params(result: ScalingResult, path: str | Path) -> Path:
    """Final validation loss of each rung against its non-embedding parameters, with the L(N) fit."""
    fig = figure(7, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    n = [r.non_embedding_params for r in result.rungs]
    ax.plot(n, [r.val_loss for r in result.rungs], "o", color="tab:blue", label="rungs (final val loss)")
    for r in result.rungs:
        ax.annotate(r.name, (r.non_embedding_params, r.val_loss), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    _fit_curve(ax, result.fit_params, n, "N")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("validation loss (nats/token)")
    budget = (f"{result.config.compute:.3g} FLOPs per rung" if result.config.compute is not None
              else f"{result.config.tokens:,.0f} tokens per rung")
    ax.set_title(f"loss vs model size ({budget})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_loss_vs_compute(result: ScalingResult, path: str | Path) -> Path:
    """Every rung's validation curve against training compute, the frontier (its lower envelope) and the L(C) fit."""
    fig = figure(7, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for r in result.rungs:
        pts = [p for p in result.points if p["rung"] == r.name]
        ax.plot([p["compute"] for p in pts], [p["val_loss"] for p in pts], "-", linewidth=1, alpha=0.8, label=r.name)
    front = [p for p in result.points if p["on_frontier"]]
    ax.plot([p["compute"] for p in front], [p["val_loss"] for p in front], "o", color="black", markersize=4,
            label="frontier")
    if front:
        _fit_curve(ax, result.fit_compute, [p["compute"] for p in front], "C")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("loss vs compute: every rung's curve and the compute-efficient frontier", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return save_png(fig, path)


def render_summary(result: ScalingResult) -> str:
    """The table and fits `tlm experiment scaling` prints."""
    lines = [f"{'rung':<10}{'layers':>7}{'width':>7}{'heads':>6}{'N (non-emb)':>13}{'tokens':>12}{'compute':>11}"
             f"{'lr':>9}{'val loss':>10}{'bpb':>8}{'train s':>9}"]
    for r in result.rungs:
        lines.append(f"{r.name:<10}{r.n_layer:>7}{r.n_embd:>7}{r.n_head:>6}{r.non_embedding_params:>13,}"
                     f"{r.tokens:>12,}{r.compute:>11.3g}{r.lr:>9.2g}{r.val_loss:>10.4f}{r.val_bpb:>8.4f}"
                     f"{r.train_seconds:>9.1f}" + ("  (reused)" if r.reused else ""))
    lines.append(f"{len(result.rungs)} rungs spanning {result.decades:.2f} decades of non-embedding parameters; "
                 f"wall time {result.wall_seconds:.0f} s")
    for fit, var, what in ((result.fit_params, "N", "final losses"), (result.fit_compute, "C", "frontier points")):
        lines.append(f"{fit.formula(var)}, {fit.points} {what}" if fit
                     else f"L({var}): {result.fit_notes.get(var) or 'too few points to fit'}")
    return "\n".join(lines)
