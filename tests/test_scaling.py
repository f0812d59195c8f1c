"""Scaling-law sweep (issue 6): the power-law fit against known laws and a brute-force least-squares reference, the
hyperparameter rule, the frontier against its definition, and `tlm experiment scaling` end to end at tiny sizes."""

from __future__ import annotations

import csv
import importlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from transformer_lm.accounting import count_params, flops_per_token
from transformer_lm.cli import main
from transformer_lm.config import ModelConfig
from transformer_lm.data import load_prepared, prepare
from transformer_lm.errors import ConfigError, DataError
from transformer_lm.experiments import scaling
from transformer_lm.tokenizers import ByteTokenizer
from transformer_lm.train import read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("E, A, alpha", [(1.7, 35.0, 0.32), (0.9, 400.0, 0.55), (2.5, 6.0, 0.08), (0.0, 30.0, 0.25)])
def test_fit_recovers_a_known_power_law(E, A, alpha):
    n = np.geomspace(2e4, 3e6, 6)
    fit = scaling.fit_power_law(n, E + A * n**-alpha)
    assert fit.alpha == pytest.approx(alpha, rel=0.01)
    assert fit.A == pytest.approx(A, rel=0.01)
    assert fit.E == pytest.approx(E, rel=0.01, abs=1e-6)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9) and fit.points == 6


def _reference_sse(x: np.ndarray, y: np.ndarray) -> float:
    """Brute force: for each α on a fine grid, E and A are a linear least-squares problem (E clamped at 0)."""
    best = math.inf
    for alpha in np.linspace(0.005, 1.5, 6000):
        f = x**-alpha
        (E, A), *_ = np.linalg.lstsq(np.stack([np.ones_like(f), f], 1), y, rcond=None)
        if E < 0:
            E, A = 0.0, float(f @ y / (f @ f))
        best = min(best, float(np.sum((E + A * f - y) ** 2)))
    return best


def test_fit_is_least_squares_and_r2_is_by_definition():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e4, 5e6, 7)
    y = 1.6 + 25 * x**-0.3 + rng.normal(0, 0.01, len(x))
    fit = scaling.fit_power_law(x, y)
    sse = float(np.sum((fit.E + fit.A * x**-fit.alpha - y) ** 2))
    assert sse <= _reference_sse(x, y) * (1 + 1e-6)  # no worse than the brute-force optimum
    assert fit.r2 == pytest.approx(1 - sse / float(np.sum((y - y.mean()) ** 2)), rel=1e-12)
    assert scaling.r_squared(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0])) == pytest.approx(0.0)
    assert scaling.r_squared(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0])) == pytest.approx(0.5)


@pytest.mark.parametrize("x, y", [([1, 2], [3, 2]), ([1, 2, 0], [3, 2, 1]), ([1, 2, 3], [3, float("nan"), 1]),
                                  ([1e4, 1e4, 1e4], [3.0, 3.1, 2.5]), ([1e4, 1e4, 1e5, 1e5], [3.0, 3.1, 2.5, 2.6])])
def test_fit_rejects_bad_points(x, y, recwarn):
    """Also fewer than 3 distinct sizes: 3 unknowns are not determined by 2 (one size gave 400 RankWarnings from the
    grid's line fits, two sizes an arbitrary curve through the two means, with an R² that looked fine)."""
    with pytest.raises(DataError):
        scaling.fit_power_law(x, y)
    assert not recwarn.list


@pytest.mark.parametrize("x", [[1e6, 2e6, 8e6], [1e3, 2e3, 8e3], [1e9, 1e10, 1e11]])
def test_fit_refuses_losses_that_do_not_fall_as_a_power_law(x):
    """An undertrained large rung (the loss rises again) drove α without bound: an OverflowError at 1e6 parameters,
    L = 3.568 + 1.6e199·N^-48.8 at 1e3. Flat losses have no exponent either."""
    for y in ([3.6495, 3.5512, 3.5846], [2.0, 2.0, 2.0], [2.0, 2.5, 3.0]):
        with pytest.raises(DataError, match="do not fall as a power law"):
            scaling.fit_power_law(x, y)
    fit = scaling.fit_power_law(x, [3.0, 2.6, 2.4])  # a falling law in the same range still fits
    assert 0 < fit.alpha < scaling.ALPHA_MAX and fit.r2 == pytest.approx(1.0)


def test_rungs_follow_the_rule():
    cfg = scaling.ScalingConfig(base_lr=3e-3, base_width=64, head_dim=32, tokens=1e6, block_size=64, batch_size=8)
    plans = scaling.plan_rungs(cfg, vocab_size=256)
    assert [p.name for p in plans] == ["L2-d32", "L2-d64", "L3-d96", "L4-d128", "L5-d160", "L6-d192"]
    for p in plans:
        assert p.train.lr == pytest.approx(3e-3 * 64 / p.model.n_embd)
        assert p.model.n_head * 32 == p.model.n_embd and p.model.block_size == 64
        assert p.train.max_iters == round(1e6 / (8 * 64))
    n = [count_params(p.model).non_embedding for p in plans]
    assert len(n) >= 5 and math.log10(max(n) / min(n)) >= 1.5 and n == sorted(n)
    matched = scaling.plan_rungs(scaling.ScalingConfig(compute=1e13, block_size=64, batch_size=8), 256)
    for p in matched:  # the same compute per rung, to within one step's tokens
        assert p.train.max_iters * 8 * 64 * flops_per_token(p.model)["train"] == pytest.approx(1e13, rel=0.01)
    for bad in (["4x100"], ["4by128"], ["2x32", "2x32"], []):
        with pytest.raises(ConfigError):
            scaling.ScalingConfig(sizes=bad)
    with pytest.raises(ConfigError, match="head_dim"):  # was a ZeroDivisionError
        scaling.ScalingConfig(head_dim=0)
    with pytest.raises(ConfigError, match="10 % off --compute"):  # 1.5 steps would round to 2: +33 % compute
        scaling.plan_rungs(scaling.ScalingConfig(sizes=["1x32"], compute=1.5 * 8 * 64 * flops_per_token(
            ModelConfig(vocab_size=256, block_size=64, n_layer=1, n_head=1, n_embd=32))["train"], block_size=64,
            batch_size=8), 256)
    small = dict(sizes=["1x32", "1x64", "2x64"], block_size=32, batch_size=4)  # the smallest rung fails first
    with pytest.raises(ConfigError, match="10 % off --compute") as refused:
        scaling.plan_rungs(scaling.ScalingConfig(**small, compute=3e7), 256)
    suggested = float(re.search(r"give --compute >= (\S+) ", str(refused.value)).group(1))
    for p in scaling.plan_rungs(scaling.ScalingConfig(**small, compute=suggested), 256):  # was refused for 1x64
        assert p.train.max_iters * 4 * 32 * flops_per_token(p.model)["train"] == pytest.approx(suggested, rel=0.1)


def test_data_fingerprint_follows_the_prepared_contents(tmp_path: Path):
    """A rung is reused only for the data it was trained on: a prepared folder prepared again from another corpus
    has another fingerprint (its path alone did not change), the same corpus prepared again the same one."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    b.write_text("pack my box with five dozen liquor jugs\n" * 300)
    prints = []
    for src in (a, a, b):
        prepare([src], tmp_path / "prep", ByteTokenizer(), overwrite=True)
        prints.append(scaling.data_fingerprint(load_prepared(tmp_path / "prep")))
    assert prints[0] == prints[1] != prints[2]


def test_frontier_matches_its_definition():
    rng = np.random.default_rng(1)
    points = [{"compute": float(c), "val_loss": float(v)} for c, v in zip(rng.uniform(1, 100, 60),
                                                                          rng.uniform(1, 5, 60))]
    scaling._mark_frontier(points)
    for p in points:  # naive: no point at most as expensive is at least as good
        beaten = any(q is not p and q["compute"] <= p["compute"] and q["val_loss"] <= p["val_loss"] for q in points)
        assert p["on_frontier"] == (not beaten)


def test_scaling_sweep_end_to_end(corpus_file: Path, tmp_path: Path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    argv = ["experiment", "scaling", str(corpus_file), "--out", str(out), "--sizes", "[1x32, 1x64, 2x64]",
            "--tokens", "4096", "--block_size", "32", "--batch_size", "8", "--evals", "2", "--eval_batches", "2",
            "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "L(N) = " in printed and "L(C) = " in printed and "L2-d64" in printed
    for name in ("scaling.csv", "scaling_points.csv", "scaling.json", "loss_vs_params.png", "loss_vs_compute.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loss_vs_params.png").read_bytes()[:8] == PNG
    with open(out / "scaling.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["L1-d32", "L1-d64", "L2-d64"]
    result = json.loads((out / "scaling.json").read_text())
    assert result["experiment"] == "scaling" and result["fit_params"]["points"] == 3
    for row in rows:  # every rung is a normal run folder; the table holds its last validation loss
        final = [r for r in read_metrics(Path(row["run_dir"]) / "metrics.jsonl") if "val_loss" in r][-1]
        assert float(row["val_loss"]) == pytest.approx(final["val_loss"])
        assert int(row["tokens"]) == 16 * 8 * 32 == final["tokens"]
        assert (Path(row["run_dir"]) / "checkpoints").is_dir()
    fit = result["fit_params"]
    losses = np.array([float(r["val_loss"]) for r in rows])
    n = np.array([int(r["non_embedding_params"]) for r in rows])
    assert fit["r2"] == pytest.approx(scaling.r_squared(losses, fit["E"] + fit["A"] * n ** -fit["alpha"]), abs=1e-9)

    with open(Path(rows[0]["run_dir"]) / "metrics.jsonl", "a") as f:
        f.write('{"step": 17, "tok')  # a line cut short by a kill: dropped, not "another run"
    assert main(argv) == 0  # a second call reuses the finished rungs
    assert capsys.readouterr().out.count("(reused)") == 3
    for rung in (out / "runs").iterdir():  # a sweep recorded with the path as typed (relative), as before
        config = json.loads((rung / "config.json").read_text())
        (rung / "config.json").write_text(json.dumps({**config, "data": {**config["data"], "source": "corpus.txt"}}))
    monkeypatch.chdir(corpus_file.parent)  # the same corpus named another way: it said "holds another run"
    assert main([*argv[:2], f"./{corpus_file.name}", *argv[3:]]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.count("(reused)") == 3
    before = (out / "scaling.json").read_text()
    for other, changed in ((["--tokens", "8192"], "tokens 4096.0 there, 8192.0 now"),  # not the sizes, unchanged
                           (["--sizes", "[1x32]"], "sizes ['1x32', '1x64', '2x64'] there, ['1x32'] now")):
        assert main([*argv, *other]) == 2  # another sweep's results are not replaced
        err = capsys.readouterr().err
        assert f"another scaling sweep ({changed});" in err and "--overwrite true" in err and err.count("\n") == 1
    assert (out / "scaling.json").read_text() == before

    def no_fit(x, y):
        raise DataError("the losses [3.6, 3.5, 3.6] do not fall as a power law of x")
    with pytest.MonkeyPatch.context() as m:  # a failed fit withholds the fit only: the rungs' results are written
        m.setattr(scaling, "fit_power_law", no_fit)
        assert main(argv) == 0
    assert "L(N): the losses [3.6, 3.5, 3.6] do not fall as a power law" in capsys.readouterr().out
    result = json.loads((out / "scaling.json").read_text())
    assert result["fit_params"] is None and "power law" in result["fit_notes"]["N"] and len(result["rungs"]) == 3


def test_a_sweep_that_cannot_run_is_refused_before_its_data_is_prepared(tmp_path: Path, monkeypatch, capsys):
    """An unavailable --device and another sweep's --out were refused only after the corpus was tokenized (12 s for
    the default stdlib corpus here, far longer for a large one)."""
    prepared = []
    monkeypatch.setattr(importlib.import_module("transformer_lm.train_data"), "training_data",
                        lambda *a, **kw: prepared.append(a))
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "scaling.json").write_text(json.dumps({"config": {"sizes": ["1x32"]}}))
    for flags, error in ((["--out", str(tmp_path / "new"), "--device", "cuda:99"], "cuda:99"),
                         (["--out", str(out)], "another scaling sweep")):
        assert main(["experiment", "scaling", *flags]) == 2
        assert error in capsys.readouterr().err and prepared == []


def test_a_sweep_stopped_by_ctrl_c_stops_and_resumes_its_rung(corpus_file: Path, tmp_path: Path, monkeypatch,
                                                               capsys):
    """Ctrl-C in a rung (here: train's stop_at, which behaves as Ctrl-C) ends the sweep as an interruption (it went
    on with a half-trained rung, or crashed on one not yet evaluated) and the same command resumes the rung: the
    results equal an uninterrupted sweep's. A rung stopped before its first checkpoint is started again."""
    argv = ["experiment", "scaling", str(corpus_file), "--sizes", "[1x32, 1x64]", "--tokens", "4096",
            "--block_size", "32", "--batch_size", "8", "--evals", "2", "--eval_batches", "2", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    real_train = scaling.train
    with monkeypatch.context() as m:
        m.setattr(scaling, "train", lambda *a, **kw: real_train(*a, **kw, stop_at=3))
        assert main([*argv, "--out", str(tmp_path / "cut")]) == 130
    assert "tlm: interrupted" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "cut")]) == 0

    def table(sweep: str) -> list[tuple[str, str, str]]:
        with open(tmp_path / sweep / "scaling.csv", newline="") as f:
            return [(r["name"], r["tokens"], r["val_loss"]) for r in csv.DictReader(f)]
    assert table("cut") == table("whole")

    def killed(*a: object, **kw: object) -> None:  # a second Ctrl-C (or a kill) before the first checkpoint
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(importlib.import_module("transformer_lm.train"), "save_checkpoint", killed)  # the module
        assert main([*argv, "--out", str(tmp_path / "killed")]) == 130
    rung = tmp_path / "killed" / "runs" / "L1-d32"
    assert (rung / "config.json").is_file() and not (rung / "checkpoints" / "latest").exists()
    # the same command starts that rung again: it had said the folder "holds another run" and asked for --overwrite
    assert main([*argv, "--out", str(tmp_path / "killed")]) == 0, capsys.readouterr().err
    assert table("killed") == table("whole")

