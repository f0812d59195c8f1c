"""Positional-encoding ablation (issue 6): the reversal task's targets against a naive construction, the accuracy
metric against an oracle, and `tlm experiment pe-ablation` end to end at a tiny size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transformer_lm.cli import main
from transformer_lm.errors import ConfigError
from transformer_lm.experiments import synthetic_pe as pe


def test_reversal_batch_targets():
    task = pe.ReversalTask(num_symbols=5, length=6)
    x, y = task.batch(50, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (50, task.block_size) == (50, 12)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        prompt = row_x[:6]
        assert all(0 <= s < 5 for s in prompt) and row_x[6] == task.separator
        full = prompt + [task.separator] + prompt[::-1]  # the whole sequence, built by hand
        assert row_x == full[:-1]
        assert row_y == [-1] * 6 + prompt[::-1]  # answer only: the reversed prompt
    assert len({tuple(r) for r in x.tolist()}) > 45  # random prompts, not one repeated


class _Oracle(torch.nn.Module):
    """Predicts the next token of a reversal sequence exactly, except at answer positions listed in `wrong`."""

    def __init__(self, task: pe.ReversalTask, wrong: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.task, self.wrong = task, wrong
        self.tok_emb = torch.nn.Embedding(1, 1)

    def forward(self, x: torch.Tensor):
        k = self.task.length
        nxt = torch.zeros_like(x)
        nxt[:, k:] = x[:, :k].flip(1)  # after the separator: the prompt reversed
        for i in self.wrong:
            nxt[:, k + i] = (nxt[:, k + i] + 1) % self.task.num_symbols
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, self.task.vocab_size).float()})


def test_accuracy_against_an_oracle():
    task = pe.ReversalTask(num_symbols=7, length=5)
    x, y = task.batch(40, torch.Generator().manual_seed(1))
    assert pe.accuracy(_Oracle(task), x, y, batch_size=16) == (1.0, 1.0, [1.0] * 5)
    tok, seq, pos = pe.accuracy(_Oracle(task, wrong=(0, 3)), x, y, batch_size=16)
    assert tok == pytest.approx(3 / 5) and seq == 0.0 and pos == [0.0, 1.0, 1.0, 0.0, 1.0]


def test_config_rejects_unknown_encoding():
    with pytest.raises(ConfigError):
        pe.PEAblationConfig(encodings=["alibi"])
    with pytest.raises(ConfigError):
        pe.ReversalTask(num_symbols=1)
    with pytest.raises(ConfigError, match="encodings names rope more than once"):  # it trained rope twice
        pe.PEAblationConfig(encodings=["rope", "none", "rope"])
    with pytest.raises(ConfigError, match="encodings is empty"):  # it said "unknown positional encoding(s) []"
        pe.PEAblationConfig(encodings=[])


@pytest.mark.parametrize("flags,error", [(["--n_embd", "24", "--n_head", "8"], "rope needs an even head size"),
                                         (["--n_embd", "9", "--n_head", "1", "--encodings", "[learned, sinusoidal]"],
                                          "sinusoidal encoding needs an even n_embd")])
def test_an_invalid_model_is_refused_before_any_encoding_trains(monkeypatch, tmp_path: Path, capsys,
                                                               flags: list, error: str):
    """Sinusoidal and learned trained (a minute at the defaults) before rope's model, with a head size of 3, was
    refused and the run ended without results: every encoding's model is checked before the first trains."""
    trained = []
    monkeypatch.setattr(pe, "train_encoding", lambda cfg, e: trained.append(e))
    code = main(["experiment", "pe-ablation", "--out", str(tmp_path / "pe"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and error in err and err.count("\n") == 1 and trained == []


def test_pe_ablation_end_to_end(tmp_path: Path, capsys):
    out = tmp_path / "pe"
    argv = ["experiment", "pe-ablation", "--out", str(out), "--steps", "3", "--batch_size", "4", "--length", "4",
            "--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--eval_sequences", "20", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "pe_ablation.json").read_text())
    assert [r["encoding"] for r in result["results"]] == ["sinusoidal", "learned", "rope", "none"]
    for r in result["results"]:
        assert r["encoding"] in printed
        assert 0 <= r["sequence_accuracy"] <= r["token_accuracy"] <= 1 and len(r["position_accuracy"]) == 4
    assert result["chance_token_accuracy"] == pytest.approx(1 / 16)
    assert (out / "pe_ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "pe_ablation.csv").read_text().count("\n") == 5


@pytest.mark.slow
def test_no_position_information_fails_where_learned_succeeds():
    """The ablation's claim at the defaults (1–2 min on 2 CPU cores): learned positions solve reversal, none
    stays far from it."""
    cfg = pe.PEAblationConfig(device="cpu")
    learned, none = pe.train_encoding(cfg, "learned"), pe.train_encoding(cfg, "none")
    assert learned.sequence_accuracy > 0.95
    assert none.sequence_accuracy < 0.05 and none.token_accuracy < 0.6
