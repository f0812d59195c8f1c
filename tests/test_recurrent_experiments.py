"""`tlm experiment speed` and `tlm experiment long-range`: the synthetic tasks against naive solvers, the scoring
against an oracle, and both pipelines end to end at tiny sizes (files, tables, the CLI)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from transformer_lm.accounting import count_params
from transformer_lm.cli import main
from transformer_lm.errors import ConfigError
from transformer_lm.experiments import long_range, report
from transformer_lm.experiments.long_range import LongRangeConfig, accuracy_by_distance, render_table, run_long_range
from transformer_lm.experiments.speed import SpeedConfig, run_speed
from transformer_lm.experiments.speed import render_table as speed_table
from transformer_lm.experiments.synthetic import AssociativeRecall, Copy, TaskBatch

RECALL = AssociativeRecall(length=7, n_symbols=10, min_length=2)
COPY = Copy(length=7, n_symbols=10, min_length=2)


def solve_recall(task: AssociativeRecall, row: list[int]) -> dict[int, tuple[int, int]]:
    """Position -> (answer, distance), read off the sequence the slow way: remember where each symbol before the
    separator stood, then answer every query after it with the symbol that followed the queried one."""
    sep = row.index(task.n_symbols)
    source = row[:sep]
    assert len(set(source)) == len(source) and max(source) < task.n_symbols
    where = {s: p for p, s in enumerate(source)}
    queries = [tok for tok in row[sep + 1:] if tok != task.n_symbols + 1]
    assert row[sep + 1:] == queries + [task.n_symbols + 1] * (len(row) - sep - 1 - len(queries))  # padded at the end
    assert sorted(queries) == sorted(source[:-1])  # every symbol but the last asked once
    return {p: (source[where[tok] + 1], p - where[tok] - 1) for p, tok in enumerate(row) if p > sep and tok in where}


def solve_copy(task: Copy, row: list[int]) -> dict[int, tuple[int, int]]:
    sep = row.index(task.n_symbols)
    source = row[:sep]
    assert len(set(source)) == len(source) and max(source) < task.n_symbols
    return {sep + i: (source[i], sep) for i in range(sep)}


def check_against_solver(batch: TaskBatch, solve, task) -> None:
    for ids, targets, dist in zip(batch.ids.tolist(), batch.targets.tolist(), batch.distance.tolist()):
        expected = solve(task, ids)
        got = {p: (t, d) for p, (t, d) in enumerate(zip(targets, dist)) if t >= 0}
        assert got == expected
        assert all(d == -1 for t, d in zip(targets, dist) if t < 0)
        assert all(ids[p - d] == t for p, (t, d) in got.items())  # the answer is the token `distance` back


@pytest.mark.parametrize("task,solve", [(RECALL, solve_recall), (COPY, solve_copy)])
def test_tasks_match_a_naive_solver(task, solve):
    gen = torch.Generator().manual_seed(0)
    batch = task.sample(64, gen)
    assert batch.ids.shape == (64, task.seq_len) and int(batch.ids.max()) < task.vocab_size
    check_against_solver(batch, solve, task)
    assert len(set(batch.distance[batch.distance >= 0].tolist())) > 3  # training mixes distances
    for d in task.distances():
        at = task.sample(8, gen, d)
        check_against_solver(at, solve, task)
        assert (at.distance == d).sum() >= 8  # every row has answers at exactly d
    again = task.sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(again.ids, batch.ids)  # seeded
    with pytest.raises(ConfigError):
        task.sample(1, gen, max(task.distances()) + 1)


def test_task_sizes_are_validated():
    with pytest.raises(ConfigError):
        AssociativeRecall(length=20, n_symbols=10)
    with pytest.raises(ConfigError):
        AssociativeRecall(length=1)
    with pytest.raises(ConfigError):
        Copy(length=20, n_symbols=10)


def test_long_range_refuses_a_bad_task_before_training_any(monkeypatch, tmp_path: Path, capsys):
    """The copy models trained first and their results were lost when the recall task turned out invalid
    afterwards: the settings (and every task's Transformer) are checked up front, before a step is trained."""
    trained = []
    monkeypatch.setattr(long_range, "train_on_task", lambda *a, **k: trained.append(a) or [0.0])
    code = main(["experiment", "long-range", "--out", str(tmp_path / "lr"), "--tasks", "[copy, recall]",
                 "--recall_length", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "recall_length must be >= 2" in err and err.count("\n") == 1 and trained == []
    with pytest.raises(ConfigError, match="rope needs an even head size"):  # at once, not when its task comes
        LongRangeConfig(n_embd=24, n_head=8)


class Oracle(nn.Module):
    """Logits that put the naive solver's answer first: what a perfect model scores."""

    def __init__(self, task, solve) -> None:
        super().__init__()
        self.task, self.solve = task, solve

    def forward(self, idx: torch.Tensor):
        logits = torch.zeros(*idx.shape, self.task.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for p, (answer, _) in self.solve(self.task, row).items():
                logits[b, p, answer] = 1.0
        return type("Out", (), {"logits": logits})


@pytest.mark.parametrize("task,solve", [(RECALL, solve_recall), (COPY, solve_copy)])
def test_accuracy_by_distance_scores_an_oracle_perfect_and_a_constant_at_chance(task, solve):
    distances = task.distances()[::3]
    assert accuracy_by_distance(Oracle(task, solve), task, distances, 64, 0, torch.device("cpu")) == \
        {d: 1.0 for d in distances}

    class Constant(nn.Module):
        def forward(self, idx):  # always the first symbol
            return type("Out", (), {"logits": nn.functional.one_hot(torch.zeros_like(idx), task.vocab_size)})

    acc = accuracy_by_distance(Constant(), task, distances, 400, 0, torch.device("cpu"))
    assert all(a < 4 * task.chance for a in acc.values())


def test_accuracy_by_distance_scores_in_bounded_chunks(monkeypatch):
    """Many answers are scored EVAL_ROWS sequences at a time (100M answers were one batch: the OOM killer ended the
    run), and the chunks together score what was asked for."""
    seen = []

    class Counting(Oracle):
        def forward(self, idx):
            seen.append(idx.size(0))
            return super().forward(idx)

    monkeypatch.setattr(long_range, "EVAL_ROWS", 7)
    d = COPY.distances()[0]
    assert accuracy_by_distance(Counting(COPY, solve_copy), COPY, [d], 50, 0, torch.device("cpu")) == {d: 1.0}
    per_row = int((COPY.sample(16, torch.Generator().manual_seed(0), d).distance == d).sum()) // 16
    assert max(seen) == 7 and sum(seen) * per_row >= 50 and (sum(seen) - 1) * per_row < 50


def test_speed_pipeline_at_tiny_size(tmp_path: Path):
    cfg = SpeedConfig(n_layer=1, n_embd=16, seq_lens=[8, 16], tokens_per_batch=32, repeats=1, device="cpu")
    rows, files = run_speed(cfg, tmp_path)
    assert [(r.arch, r.seq_len) for r in rows] == [(a, T) for T in (8, 16) for a in ("transformer", "lstm", "rnn")]
    assert all(r.train_tokens_per_s > 0 and r.forward_ms > 0 for r in rows)
    assert {r.batch_size for r in rows if r.seq_len == 16} == {2}
    sizes = {r.arch: r.non_embedding_params for r in rows}
    assert all(abs(n - sizes["transformer"]) / sizes["transformer"] < 0.05 for n in sizes.values())
    with open(files["csv"]) as f:
        assert len(list(csv.DictReader(f))) == 6
    saved = json.loads(files["json"].read_text())
    assert saved["settings"]["models"]["lstm"]["arch"] == "lstm" and len(saved["rows"]) == 6
    assert files["png"].read_bytes()[:4] == b"\x89PNG"
    table = speed_table(rows)
    assert "× vs lstm" in table and "× vs rnn" in table and table.count("\n") == 4
    with pytest.raises(ConfigError):
        SpeedConfig(archs=["gru"])
    with pytest.raises(ConfigError, match="exceeds"):
        from transformer_lm.experiments.speed import measure

        measure({"transformer": cfg.model_configs()["transformer"]}, [cfg.model_configs()["transformer"].block_size
                                                                      + 1], device="cpu")


def test_long_range_pipeline_at_tiny_size(tmp_path: Path):
    cfg = LongRangeConfig(recall_length=4, copy_length=4, n_layer=1, n_embd=16, n_head=2, steps=3,
                          batch_size=4, eval_distances=3, eval_answers=8, device="cpu")
    results, files = run_long_range(cfg, tmp_path)
    assert [(r.task, r.arch) for r in results] == [(t, a) for t in ("recall", "copy") for a in ("transformer", "lstm")]
    for r in results:
        assert len(r.accuracy) == 3 and all(0 <= a <= 1 for a in r.accuracy.values()) and r.steps == 3
        configs = cfg.model_configs(cfg.task(r.task))
        assert r.non_embedding_params == count_params(configs[r.arch]).non_embedding
    with open(files["csv"]) as f:
        assert len(list(csv.DictReader(f))) == 2 * 2 * 3
    assert json.loads(files["json"].read_text())["settings"]["steps"] == 3
    assert files["png"].read_bytes()[:4] == b"\x89PNG"
    assert "recall (chance 0.333)" in render_table(results)
    with pytest.raises(ConfigError):
        LongRangeConfig(tasks=["brackets"])
    with pytest.raises(ConfigError, match="tasks names copy more than once"):
        LongRangeConfig(tasks=["copy", "copy"])
    for empty, error in (({"tasks": []}, "tasks is empty"), ({"archs": []}, "archs is empty")):  # not "unknown []"
        with pytest.raises(ConfigError, match=error):
            LongRangeConfig(**empty)
    with pytest.raises(ConfigError, match="archs is empty"):
        SpeedConfig(archs=[])
    with pytest.raises(ConfigError, match="seq_lens names 64 more than once"):
        SpeedConfig(seq_lens=[64, 128, 64])


def test_cli_experiments(tmp_path: Path, capsys):
    code = main(["experiment", "speed", "--out", str(tmp_path / "speed"), "--n_layer", "1", "--n_embd", "16",
                 "--seq_lens", "[8]", "--tokens_per_batch", "16", "--repeats", "1", "--archs", "[transformer,lstm]"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "× vs lstm" in out and (tmp_path / "speed" / "speed.png").exists()
    before = (tmp_path / "speed" / "speed.json").read_bytes()
    code = main(["experiment", "speed", "--out", str(tmp_path / "speed"), "--n_layer", "2"])  # refused before measuring
    out, err = capsys.readouterr()
    assert code == 2 and "earlier `tlm experiment speed` (speed.csv)" in err and err.count("\n") == 1
    assert (tmp_path / "speed" / "speed.json").read_bytes() == before
    code = main(["experiment", "long-range", "--out", str(tmp_path / "lr"), "--tasks", "[copy]", "--copy_length", "3",
                 "--n_layer", "1", "--n_embd", "8", "--n_head", "2", "--steps", "2", "--batch_size", "2",
                 "--eval_distances", "2", "--eval_answers", "4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "copy (chance" in out and (tmp_path / "lr" / "long_range.csv").exists()
    _, shown = report.collect([tmp_path / "speed", tmp_path / "lr"])  # `tlm report` shows both JSON summaries
    assert [[d["experiment"] for _, d in e.summaries] for e in shown] == [["speed"], ["long-range"]]
    code = main(["experiment", "long-range", "--archs", "[gru]", "--out", str(tmp_path / "bad")])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("tlm: error:") and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("task,size", [("copy", {"copy_length": 24}), ("recall", {"recall_length": 16})])
def test_transformer_reaches_far_where_the_lstm_does_not(tmp_path: Path, task: str, size: dict):
    """The experiment's claim at a reduced size (25-45 s a task on one thread): the Transformer answers at every
    distance, the LSTM of matched size falls far below it at the longest. Measured at these settings: Transformer
    99-100 % at every distance (copy seeds 0-2, recall seeds 0-3); LSTM at the longest distance 31-32 % (copy,
    seeds 0-2) and 0.4 % (recall, seed 0)."""
    cfg = LongRangeConfig(tasks=[task], steps=800, eval_distances=4, eval_answers=256, device="cpu", **size)
    results, _ = run_long_range(cfg, tmp_path)
    acc = {r.arch: list(r.accuracy.values()) for r in results}
    assert min(acc["transformer"]) >= 0.9, acc
    assert acc["lstm"][-1] < acc["transformer"][-1] - 0.4, acc
