"""benchmarks/gpu_perf.py, the script a lent GPU runs once, run here on the CPU at a tiny size: every row must finish
without an error (a GPU session has minutes, not time to debug it), and its figures must follow from their own
definitions. No timing assertions."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from transformer_lm.accounting import flops_per_token
from transformer_lm.config import ModelConfig, preset
from transformer_lm.model import Transformer
from transformer_lm.perf import decode_bytes_per_token

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_perf.py"


def run_script(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "perf.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--preset", "tiny", "--batch", "2",
                           "--steps", "1", "--new_tokens", "8", "--compile", "0", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())["rows"]


def test_every_row_runs_and_its_figures_follow_from_their_definitions(tmp_path: Path):
    rows = run_script(tmp_path, "--big_preset", "tiny-llama", "--budget_s", "1e9")
    assert [r.split(" ")[0] for r in rows] == ["train", "decode", "decode", "train", "train", "train", "decode"]
    for name, r in rows.items():
        assert "error" not in r, (name, r)
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, name
    config = ModelConfig(**preset("tiny"))
    train = rows["train tiny fp32 2x256"]
    assert math.isclose(train["tokens_per_s"], 2 * 256 / train["step_s"], rel_tol=1e-9)
    assert math.isclose(train["mfu"], flops_per_token(config)["train"] * train["tokens_per_s"]
                        / (train["peak_tflops"] * 1e12), rel_tol=1e-9)
    # the CPU reference and the "device" are the same CPU here: the comparison itself must report equality
    fp32 = rows["decode batch 1 tiny fp32"]
    assert fp32["greedy_equal_to_cpu"] is True and fp32["first_mismatch"] is None
    with torch.device("meta"):  # the decoded weights' bytes, counted without allocating them
        read = decode_bytes_per_token(Transformer(config), config, 16 + 8 // 2)  # 16-token prompt, mean cached length
    assert math.isclose(fp32["mbu"], read * fp32["tokens_per_s"] / (fp32["bandwidth_gb_s"] * 1e9), rel_tol=1e-9)


def test_diagnostic_rows_wait_for_the_budget(tmp_path: Path):
    rows = run_script(tmp_path, "--big_preset", "none", "--budget_s", "0")
    assert list(rows) == ["train tiny fp32 2x256", "decode batch 1 tiny fp32"]


def load_script() -> ModuleType:
    """benchmarks/gpu_perf.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("gpu_perf", SCRIPT)
    gpu_perf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_perf)
    return gpu_perf


def test_a_diagnostic_row_starts_only_where_it_would_end_within_the_budget():
    gpu_perf = load_script()
    assert gpu_perf.fits(100.0, 60.0, 240.0)
    assert not gpu_perf.fits(200.0, 60.0, 240.0)  # begun before the budget, but it would end 20 s past it


def test_the_padded_vocabulary_is_the_next_multiple_of_64():
    gpu_perf = load_script()
    gpt2 = ModelConfig(**preset("gpt2"))
    assert gpu_perf.padded(gpt2).vocab_size == 50304  # nanoGPT's padded GPT-2 vocabulary
    assert gpu_perf.padded(ModelConfig(vocab_size=256)).vocab_size == 256
    assert gpu_perf.padded(gpt2).n_layer == gpt2.n_layer
