"""Optimizers and schedules: Muon routing and update rule against a naive Newton–Schulz, Muon training and exact
resume, the warmup–stable–decay schedule placed by iteration and by (simulated) wall-clock budgets."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from transformer_lm.config import ModelConfig, TrainConfig
from transformer_lm.errors import CheckpointError, ConfigError
from transformer_lm.model import Transformer
from transformer_lm.optim import BatchedMuon, MuonAdamW, config_hyperparameters, lr_at, make_optimizer
from transformer_lm.train import Budget, read_metrics, train
from transformer_lm.train_data import training_data

SMALL = dict(block_size=32, n_layer=2, n_head=2, n_embd=32)
needs_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's quintic Newton–Schulz iteration, written out: an approximate U·Vᵀ of g = U·S·Vᵀ."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if transposed else x


def test_muon_on_a_torch_without_it_is_a_clear_config_error(monkeypatch):
    """torch < 2.9 has no torch.optim.Muon: the package still imports (BatchedMuon is defined all the same) and
    asking for Muon names the version and the way out instead of failing in the middle of training."""
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    model = Transformer(ModelConfig(**SMALL)).init_weights(0)
    with pytest.raises(ConfigError, match=r"needs torch >= 2\.9.*--train\.optimizer adamw"):
        make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))


@needs_muon
def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = Transformer(ModelConfig(**SMALL, tie_embeddings=False)).init_weights(0)
    opt = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    muon, adamw = opt.parts
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    expected = {id(p) for name, p in model.named_parameters() if p.dim() == 2 and name.startswith("blocks.")}
    assert muon_ids == expected
    adamw_ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert adamw_ids == {id(p) for p in model.parameters()} - expected
    assert id(model.lm_head.weight) in adamw_ids and id(model.tok_emb.weight) in adamw_ids


@needs_muon
def test_muon_first_step_is_the_orthogonalized_gradient():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL)).init_weights(0)
    cfg = TrainConfig(optimizer="muon", muon_lr=0.05, lr=1e-3, weight_decay=0.0)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    x = torch.randint(0, 256, (4, 32))
    model(x, x).loss.backward()
    w = next(p for n, p in model.named_parameters() if n.startswith("blocks.0.") and p.dim() == 2)
    before, grad = w.detach().clone(), w.grad.detach().clone()
    opt.step()
    rows, cols = w.shape
    update = (before - w.detach()) / (0.05 * math.sqrt(max(1.0, rows / cols)))
    expected = newton_schulz(grad)  # torch runs the iteration in bfloat16: equal up to its rounding
    assert (update - expected).norm() / expected.norm() < 0.1
    singular = torch.linalg.svdvals(update)
    assert 0.6 < singular.median() and singular.max() < 1.3  # near-orthogonal: singular values about 1


@needs_muon
@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_muon_steps_equal_torch_muon(nesterov: bool):
    """Same-shape matrices orthogonalized as one batch give torch.optim.Muon's parameters and momentum, step by step
    (tall, wide and square matrices, weight decay, a parameter without a gradient left alone)."""
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 16), (16, 48), (48, 16), (16, 16), (24, 16)]
    ref = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    kw = dict(lr=0.03, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    torch_muon, batched = torch.optim.Muon(ref, **kw), BatchedMuon(ours, **kw)
    for step in range(4):
        for i, (p, q) in enumerate(zip(ref, ours)):
            g = None if (step, i) == (2, 5) else torch.randn(p.shape)
            p.grad, q.grad = g, None if g is None else g.clone()
        torch_muon.step()
        batched.step()
        for p, q in zip(ref, ours):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(batched.state[q]["momentum_buffer"], torch_muon.state[p]["momentum_buffer"])


@needs_muon
def test_muon_reduces_loss_and_resumes_exactly(corpus_file: Path, tmp_path: Path):
    data = training_data(corpus_file, "char")
    cfg = TrainConfig(batch_size=4, max_iters=40, eval_interval=40, eval_batches=2, log_interval=1, warmup_iters=5,
                      optimizer="muon", lr=3e-3, muon_lr=0.03)
    whole = train(ModelConfig(**SMALL), cfg, data, tmp_path / "whole", progress=False)
    curve = {r["step"]: r["loss"] for r in read_metrics(whole.run_dir / "metrics.jsonl") if "loss" in r}
    assert curve[40] < curve[1] - 1.0
    part = train(ModelConfig(**SMALL), cfg, data, tmp_path / "part", progress=False, stop_at=17)
    assert part.interrupted
    train(ModelConfig(**SMALL), cfg, data, tmp_path / "part", resume=True, progress=False)
    resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl") if "loss" in r}
    assert resumed == curve


@needs_muon
def test_muon_state_dict_round_trip():
    model = Transformer(ModelConfig(**SMALL)).init_weights(0)
    opt = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    x = torch.randint(0, 256, (2, 32))
    model(x, x).loss.backward()
    opt.step()
    sd = opt.state_dict()
    n_params = sum(1 for _ in model.parameters())
    assert sorted(i for g in sd["param_groups"] for i in g["params"]) == list(range(n_params))
    fresh = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    fresh.load_state_dict(sd)
    for a, b in zip(opt.parts, fresh.parts):
        for (ka, sa), (kb, sb) in zip(a.state.items(), b.state.items()):
            assert ka is kb
            for name in sa:
                torch.testing.assert_close(sa[name], sb[name])



@needs_muon
@pytest.mark.parametrize("tied", [True, False])
def test_resuming_with_the_other_optimizer_is_a_checkpoint_error(corpus_file: Path, tmp_path: Path, tied: bool):
    """--train.optimizer changed on --resume: AdamW's state went into Muon + AdamW unnoticed (a tied head gives both
    two groups of the same sizes), Muon's into AdamW ended in a KeyError traceback; the saved run stays as it was."""
    data = training_data(corpus_file, "char")
    model = ModelConfig(**SMALL, tie_embeddings=tied)
    for saved, other in [("adamw", "muon"), ("muon", "adamw")]:
        cfg = TrainConfig(batch_size=2, max_iters=2, eval_interval=2, eval_batches=1, warmup_iters=1, optimizer=saved)
        run = train(model, cfg, data, tmp_path / saved, progress=False).run_dir
        files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        with pytest.raises(CheckpointError, match=f"holds {saved} optimizer state.*--train.optimizer {saved}"):
            train(model, TrainConfig(**{**cfg.__dict__, "max_iters": 4, "optimizer": other}), data, run, resume=True,
                  progress=False)
        assert files == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

def test_wsd_schedule_shape():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_iters=0, max_iters=100, schedule="wsd", cooldown_fraction=0.2)
    assert lr_at(10, 0.5, cfg) == lr_at(10, 0.8, cfg) == 1.0
    assert lr_at(10, 0.9, cfg) == pytest.approx(0.55)
    assert lr_at(10, 1.0, cfg) == pytest.approx(0.1)
    budget = Budget(cfg, tokens_per_step=1)
    lrs = [lr_at(s, budget.progress_after(s, 0.0), cfg) for s in range(100)]
    assert lrs[79] == 1.0 and lrs[80] < 1.0 and lrs[-1] == pytest.approx(0.1)  # the cooldown is the last 20 steps


@pytest.mark.parametrize("cooldown_fraction", [0.1, 0.2, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_wsd_ends_exactly_at_the_floor_and_never_below(cooldown_fraction: float, min_lr_ratio: float):
    """The cooldown's formula, lr·min_lr_ratio + (lr - lr·min_lr_ratio)·(1 - progress)/cooldown_fraction, at every
    step of a 100-step budget: at its end the floor exactly (computed from the cooldown's start, 1 - 0.3 rounded
    made (progress - start)/0.3 exceed 1 and the last step's lr -2e-19 with a floor of 0), and never below it."""
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=min_lr_ratio, warmup_iters=0, max_iters=100, schedule="wsd",
                      cooldown_fraction=cooldown_fraction)
    budget, floor = Budget(cfg, tokens_per_step=1), 1e-3 * min_lr_ratio
    for s in range(100):
        p = budget.progress_after(s, 0.0)
        expected = 1e-3 if p <= 1 - cooldown_fraction else floor + (1e-3 - floor) * (1 - p) / cooldown_fraction
        assert lr_at(s, p, cfg) == pytest.approx(expected, rel=1e-12, abs=0) and lr_at(s, p, cfg) >= floor, s
    assert lr_at(99, budget.progress_after(99, 0.0), cfg) == floor


def test_wsd_cooldown_ends_with_a_time_budget(corpus_file: Path, tmp_path: Path, monkeypatch):
    """With a clock where every step takes 0.5 s and a 10 s budget, the run takes 20 steps and the cooldown
    occupies the last 20% of the 9 s after warmup, ending at the minimum exactly on the last step: the schedule a
    20-step budget gives (the time budget counted warmup in, and placed its cooldown 0.4 steps later)."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(time, "perf_counter", lambda: 0.5 * next(ticks))  # each read 0.5 s after the last
    data = training_data(corpus_file, "char")
    cfg = TrainConfig(batch_size=2, max_iters=None, max_time=10.0, schedule="wsd", cooldown_fraction=0.2, lr=1e-3,
                      min_lr_ratio=0.0, warmup_iters=2, log_interval=1, eval_interval=1000, eval_batches=1)
    res = train(ModelConfig(**SMALL), cfg, data, tmp_path / "run", progress=False)
    lrs = [r["lr"] for r in read_metrics(res.run_dir / "metrics.jsonl") if "lr" in r]
    assert res.step == len(lrs) == 20
    assert lrs[:2] == pytest.approx([5e-4, 1e-3]) and lrs[2:16] == pytest.approx([1e-3] * 14)
    assert lrs[16:] == pytest.approx([1e-3 * f for f in (5 / 6, 5 / 9, 5 / 18, 0.0)], abs=1e-12)
    by_steps = train(ModelConfig(**SMALL), TrainConfig(**{**cfg.__dict__, "max_iters": 20, "max_time": None}), data,
                     tmp_path / "steps", progress=False)
    assert [r["lr"] for r in read_metrics(by_steps.run_dir / "metrics.jsonl") if "lr" in r] == pytest.approx(lrs)


@pytest.mark.parametrize("name", ["adamw", pytest.param("muon", marks=needs_muon)])
def test_a_loaded_state_keeps_the_moments_and_takes_the_configs_hyperparameters(name):
    """load_state_dict replaces every group's settings with the saved run's: a resumed run's --train.weight_decay,
    betas, muon_momentum and muon_lr were silently ignored (only lr applied)."""
    model = Transformer(ModelConfig(**SMALL)).init_weights(0)
    old = make_optimizer(model, TrainConfig(optimizer=name), torch.device("cpu"))
    model(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))).loss.backward()
    old.step()
    new_cfg = TrainConfig(optimizer=name, weight_decay=0.0, beta1=0.8, beta2=0.95, muon_momentum=0.8, muon_lr=0.05)
    new = make_optimizer(model, new_cfg, torch.device("cpu"))
    expected = [{k: v for k, v in g.items() if k != "params"} for g in new.param_groups]
    with config_hyperparameters(new):
        new.load_state_dict(old.state_dict())
    assert [{k: v for k, v in g.items() if k != "params"} for g in new.param_groups] == expected
    assert {g["weight_decay"] for g in new.param_groups} == {0.0}
    moments = [s for part in getattr(new, "parts", [new]) for s in part.state.values()]
    saved = [s for part in getattr(old, "parts", [old]) for s in part.state.values()]
    assert len(moments) == len(saved) > 0
    assert all(torch.equal(a[k], b[k]) for a, b in zip(moments, saved) for k in a if torch.is_tensor(a[k]))
