"""Issue 6 experiments: the planner against published figures and hand-computed values; attention maps and
per-token surprisal against the model computed independently; `tlm plan` and `tlm attention` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from transformer_lm.api import load_run
from transformer_lm.cli import main
from transformer_lm.config import ModelConfig, TrainConfig
from transformer_lm.errors import ConfigError, DataError
from transformer_lm.experiments import attention as attn
from transformer_lm.experiments import planner
from transformer_lm.train import train
from transformer_lm.train_data import training_data

# GPT-3 175B (Brown et al. 2020, Table 2.1): 96 layers, d_model 12288, 96 heads, context 2048, GPT-2 vocabulary.
GPT3_175B = ModelConfig(vocab_size=50257, block_size=2048, n_layer=96, n_head=96, n_embd=12288)


# The planner

def test_gpt3_training_flops_match_published():
    """Brown et al. 2020, Table D.1: GPT-3 175B trained on 300B tokens used 3.14e23 FLOPs."""
    bare = planner.plan(params=175e9, tokens=300e9)
    assert bare.total_flops == pytest.approx(6 * 175e9 * 300e9)
    assert bare.total_flops == pytest.approx(3.14e23, rel=0.05)
    arch = planner.plan(config=GPT3_175B, tokens=300e9)
    assert arch.params == pytest.approx(175e9, rel=0.01)
    assert arch.attention_flops > 0 and arch.total_flops == pytest.approx(3.14e23, rel=0.05)
    # attention: 3 (fwd+bwd) × 2 matmuls × 2 FLOPs × layers × context × d_model per token
    assert arch.attention_flops == pytest.approx(3 * 4 * 96 * 2048 * 12288 * 300e9)


def test_chinchilla_flops_and_optimal_ratio():
    """Hoffmann et al. 2022: Chinchilla, 70B parameters on 1.4T tokens, 5.76e23 FLOPs; ~20 tokens per parameter."""
    p = planner.plan(params=70e9, tokens=1.4e12)
    assert p.total_flops == pytest.approx(5.76e23, rel=0.05)
    n, d = planner.chinchilla_optimal(5.76e23)
    assert d / n == pytest.approx(20.0)
    assert 6 * n * d == pytest.approx(5.76e23)
    assert n == pytest.approx(70e9, rel=0.05) and d == pytest.approx(1.4e12, rel=0.05)
    # by hand: N = sqrt(C / 120)
    assert planner.chinchilla_optimal(1.2e21)[0] == pytest.approx(math.sqrt(1e19))
    # compute alone plans the optimal model; a model alone defaults to 20 tokens per parameter
    alone = planner.plan(compute=5.76e23)
    assert alone.params == pytest.approx(n) and alone.tokens == pytest.approx(d)
    assert planner.plan(params=1e9).tokens == pytest.approx(20e9)


def test_time_energy_memory_by_hand():
    p = planner.plan(params=1e9, tokens=20e9, hardware="h100 sxm", mfu=0.5, gpus=8, pue=1.2)
    (e,) = p.estimates
    flops = 6 * 1e9 * 20e9
    seconds = flops / (8 * 989.4e12 * 0.5)
    assert e.hardware == "H100-SXM" and e.seconds == pytest.approx(seconds)
    assert e.gpu_hours == pytest.approx(8 * seconds / 3600)
    assert e.energy_kwh == pytest.approx(8 * seconds / 3600 * 0.700 * 1.2)
    assert p.memory_bytes["train_replicated"] == 16e9 and p.memory_bytes["train_sharded"] == 2e9
    assert e.fits_replicated and e.fits_sharded
    assert not planner.plan(params=70e9, hardware="A100-80GB").estimates[0].fits_replicated


def test_llama2_70b_gpu_hours_match_published():
    """Touvron et al. 2023 (Llama 2), Table 2: 70B on 2T tokens took 1,720,320 A100-80GB GPU-hours at 400 W. At the
    MFU that implies (~0.435), the planner reproduces both the hours and the 688 MWh."""
    (e,) = planner.plan(params=70e9, tokens=2e12, hardware="a100-80gb", mfu=0.435).estimates
    assert e.gpu_hours == pytest.approx(1_720_320, rel=0.02)
    assert e.energy_kwh == pytest.approx(1_720_320 * 0.4, rel=0.02)


def test_accelerator_table_and_bad_input():
    assert len(planner.ACCELERATORS) >= 8
    for a in planner.ACCELERATORS.values():
        assert a.bf16_tflops > 0 and a.memory_gb > 0 and a.source
    assert {e.hardware for e in planner.plan(params=1e9, hardware="all").estimates} >= {"H100-SXM", "MI300X",
                                                                                        "TPU-v5e"}
    assert planner.accelerator("mi300x").bf16_tflops == pytest.approx(1307.4)
    assert planner.parse_count("1.4T") == 1.4e12 and planner.parse_count("175B") == 175e9
    assert planner.parse_count("3.14e23") == 3.14e23 and planner.parse_count(7) == 7.0
    for bad in (lambda: planner.accelerator("abacus"), lambda: planner.parse_count("lots"),
                lambda: planner.parse_count("-5"), lambda: planner.plan(params=1e9, mfu=1.5),
                lambda: planner.plan(params=1e9, gpus=0), lambda: planner.plan(),
                lambda: planner.plan(params=1e9, hardware="TPU-v5e", precision="fp32"),
                lambda: planner.plan(params=1e9, config=GPT3_175B),
                lambda: planner.plan(params=1e9, seq_len=2048), lambda: planner.plan(compute=1e21, seq_len=2048),
                lambda: planner.plan(params=1e9, mfu=1e-320), lambda: planner.plan(params=1e9, pue=1e308)):
        with pytest.raises(ConfigError):
            bad()


# Attention maps and surprisal

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_corpus

    root = tmp_path_factory.mktemp("attn")
    corpus = root / "corpus.txt"
    corpus.write_text(make_corpus(), encoding="utf-8")
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)
    tcfg = TrainConfig(batch_size=4, max_iters=5, eval_interval=5, eval_batches=1, log_interval=5, warmup_iters=1)
    train(cfg, tcfg, training_data(corpus, "char"), root / "run", progress=False)
    return root / "run"


TEXT = "def alpha(beta):\n    return beta"


def test_attention_maps_and_surprisal_match_the_model(tiny_run: Path):
    run = load_run(tiny_run, "cpu")
    report = attn.analyze(run.model, run.tokenizer, TEXT)
    ids = run.tokenizer.encode(TEXT)
    assert report.ids == ids and "".join(report.tokens) == TEXT
    with torch.no_grad():
        out = run.model(torch.tensor([ids]), return_attentions=True)
    assert report.attentions.shape == (2, 2, len(ids), len(ids))
    for layer, w in enumerate(out.attentions):
        torch.testing.assert_close(report.attentions[layer], w[0])
    torch.testing.assert_close(report.attentions.sum(-1), torch.ones(2, 2, len(ids)))
    assert torch.all(report.attentions.triu(diagonal=1) == 0)  # causal
    # surprisal: the cross-entropy of each next token, computed here independently
    ce = F.cross_entropy(out.logits[0, :-1], torch.tensor(ids[1:]), reduction="none")
    assert report.surprisal[0] is None
    assert report.surprisal[1:] == pytest.approx(ce.tolist(), abs=1e-5)
    assert report.mean_loss == pytest.approx(ce.mean().item(), abs=1e-5)
    # top attended: the argmax of each row first, weights descending
    top = report.top_attended(-1, 1, k=3)
    assert len(top[0]) == 1 and all(len(t) == 3 for t in top[2:])
    for t, row in enumerate(top):
        assert row[0][0] == int(report.attentions[1, 1, t].argmax())
        assert [w for _, w in row] == sorted((w for _, w in row), reverse=True)
    mean = report.head_weights(0, None)
    torch.testing.assert_close(mean, report.attentions[0].mean(0))


def test_attention_files_and_table(tiny_run: Path, tmp_path: Path):
    run = load_run(tiny_run, "cpu")
    report = attn.analyze(run.model, run.tokenizer, TEXT)
    files = attn.write_report(report, tmp_path / "out", layer=0, head=1)
    for name in ("attention_grid.png", "attention_L0_H1.png", "surprisal.png", "attention.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert (tmp_path / "out" / "attention_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(files["json"].read_text(encoding="utf-8"))
    assert data["layer"] == 0 and data["head"] == 1 and len(data["tokens"]) == len(report.ids)
    assert data["tokens"][1]["surprisal_nats"] == pytest.approx(report.surprisal[1])
    table = attn.render_table(report, 0, 1)
    assert len(table.splitlines()) == len(report.ids) + 2 and "mean loss" in table
    with pytest.raises(DataError):
        attn.analyze(run.model, run.tokenizer, "")
    with pytest.raises(DataError):
        attn.analyze(run.model, run.tokenizer, "d")
    with pytest.raises(ConfigError):
        report.top_attended(2, 0)
    with pytest.raises(ConfigError):
        report.top_attended(0, 5)
    long = attn.analyze(run.model, run.tokenizer, TEXT * 3)
    assert long.truncated and len(long.ids) == 32


# The CLI

def tlm(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_plan(capsys):
    code, out, err = tlm(capsys, "plan", "--params", "175B", "--tokens", "300B", "--json", "true")
    assert code == 0, err
    assert json.loads(out)["total_flops"] == pytest.approx(3.15e23)
    code, out, err = tlm(capsys, "plan", "--preset", "gpt2", "--model.n_layer", "6", "--tokens", "10B",
                         "--hardware", "all", "--gpus", "8")
    assert code == 0, err
    assert "MI300X" in out and "Chinchilla-optimal" in out and "context 1024" in out
    code, out, err = tlm(capsys, "plan", "--preset", "gpt2", "--tokens", "10B")
    # the dense term is 6 × the matmul weights (Q/K/V, projections, FFN, the tied head) × D, not the printed N
    # (124,439,808, which counts the position table and the norms): it was labelled "(6·N·D)"
    weights = 12 * (768 * 3 * 768 + 768 * 768 + 2 * 768 * 3072) + 50257 * 768
    assert f"{6 * weights * 10e9:.3e} dense (6 × {weights:,} matmul weights × D)" in out
    code, out, err = tlm(capsys, "plan", "--preset", "gpt2", "--json", "true")
    assert json.loads(out)["config"]["n_embd"] == 768
    code, out, err = tlm(capsys, "plan", "--compute", "5.76e23", "--hardware", "A100-80GB", "--gpus", "1024")
    assert code == 0 and "69,282,032,303 parameters (Chinchilla-optimal for --compute)" in out
    code, out, err = tlm(capsys, "plan", "--compute", "1e20", "--tokens", "1e9")  # N = C/(6D), not the optimum
    assert code == 0 and "16,666,666,667 parameters (N = C / (6·D)" in out and "Chinchilla-optimal for" not in out


@pytest.mark.parametrize("argv", [["--params", "1B", "--hardware", "abacus"], ["--params", "lots"],
                                  ["--params", "1B", "--mfu", "0"], ["--params", "1B", "--preset", "gpt2"],
                                  ["--params", "1B", "--seq_len", "2048"], ["--compute", "1e21", "--seq_len", "8"],
                                  ["--params", "1B", "--pue", "1e308", "--json", "true"]])  # was JSON Infinity kWh
def test_cli_plan_bad_input(capsys, argv):
    code, out, err = tlm(capsys, "plan", *argv)
    assert code == 2 and out == "" and err.startswith("tlm: error:") and err.count("\n") == 1


def test_cli_attention(tiny_run: Path, tmp_path: Path, capsys):
    out_dir = tmp_path / "maps"
    code, out, err = tlm(capsys, "attention", tiny_run, TEXT, "--out", out_dir, "--layer", "1", "--head", "0",
                         "--device", "cpu")
    assert code == 0, err
    assert "top-3 attended (layer 1, head 0)" in out and "mean loss" in out
    assert (out_dir / "attention_L1_H0.png").stat().st_size > 0
    before = (out_dir / "attention.json").read_bytes()
    code, out, err = tlm(capsys, "attention", tiny_run, "other text", "--out", out_dir, "--device", "cpu")
    assert code == 2 and "earlier `tlm attention`" in err and "--overwrite true" in err and err.count("\n") == 1
    assert (out_dir / "attention.json").read_bytes() == before  # the earlier maps are kept
    code, out, err = tlm(capsys, "attention", tiny_run, TEXT, "--out", out_dir, "--head", "null", "--json", "true",
                         "--device", "cpu", "--overwrite", "true")
    assert code == 0, err
    data = json.loads(out)
    assert data["head"] is None and data["step"] == 5 and (out_dir / "attention_L1_Hmean.png").is_file()
    assert not (out_dir / "attention_L1_H0.png").exists()  # the earlier run's zoom is not left beside the new maps
    before = sorted((p.name, p.read_bytes()) for p in out_dir.iterdir())
    for argv in ([tiny_run, "", "--out", out_dir], [tiny_run, TEXT, "--out", out_dir, "--layer", "7"],
                 [tiny_run, TEXT, "--out", out_dir, "--head", "9"], [tiny_run, TEXT, "--out", out_dir, "--top_k", "0"],
                 [tmp_path / "missing", TEXT, "--out", out_dir]):
        code, out, err = tlm(capsys, "attention", *argv, "--device", "cpu", "--overwrite", "true")
        assert code == 2 and err.startswith("tlm: error:") and err.count("\n") == 1, err
        assert sorted((p.name, p.read_bytes()) for p in out_dir.iterdir()) == before  # refused before any deletion
    code, out, err = tlm(capsys, "attention", tiny_run, TEXT, "--out", tmp_path / "fresh", "--top_k", "0")
    assert code == 2 and not (tmp_path / "fresh").exists()  # no half-written maps to refuse the corrected command
