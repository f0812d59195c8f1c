"""`tlm train` under torchrun (2 processes, gloo on CPU): DDP and FSDP2 follow the single-process loss curve of the
same global batch, write one run folder from rank 0, and checkpoint in the single-process format."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_corpus
from transformer_lm.cli import main
from transformer_lm.config import ModelConfig, TrainConfig
from transformer_lm.data import BatchSampler, PreparedData, load_prepared, prepare
from transformer_lm.errors import ConfigError
from transformer_lm.tokenizers import build_tokenizer
from transformer_lm.train import read_metrics, train

MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)
TRAIN = dict(batch_size=4, grad_accum=2, max_iters=20, log_interval=1, eval_interval=10, eval_batches=2, device="cpu")
ARGS = [f"--model.{k}={v}" for k, v in MODEL.items()] + [f"--train.{k}={v}" for k, v in TRAIN.items()]
TOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    root = tmp_path_factory.mktemp("dist-data")
    corpus = root / "corpus.txt"
    corpus.write_text(make_corpus(), encoding="utf-8")
    prepare([corpus], root / "prepared", build_tokenizer("char", [corpus.read_text(encoding="utf-8")]))
    return load_prepared(root / "prepared")


@pytest.fixture(scope="module")
def reference(data: PreparedData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A single-process run of the same global batch."""
    run = tmp_path_factory.mktemp("dist-ref") / "run"
    train(ModelConfig(**MODEL), TrainConfig(**TRAIN), data, run, progress=False)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*argv: str | Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """`tlm train ...` started by PyTorch's launcher on this machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "transformer_lm.cli", "train",
           *map(str, argv)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def curve(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if key in r}


def final_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / "step-0000020"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_single_process(parallel: str, data: PreparedData, reference: Path, tmp_path: Path):
    run = tmp_path / parallel
    proc = torchrun(data.path, "--out", run, *ARGS, f"--train.parallel={parallel}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"{run}: 20 steps") == 1  # rank 0 alone reports
    assert len(read_metrics(run / "metrics.jsonl")) == len(read_metrics(reference / "metrics.jsonl"))  # one writer
    ref, got = curve(reference), curve(run)
    assert sorted(got) == list(range(1, 21))
    assert all(abs(got[s] - ref[s]) <= TOL for s in ref), [(s, got[s] - ref[s]) for s in ref]
    ref_val, got_val = curve(reference, "val_loss"), curve(run, "val_loss")
    assert sorted(got_val) == [10, 20] and all(abs(got_val[s] - ref_val[s]) <= TOL for s in ref_val)
    # the checkpoint holds whole weights and optimizer state (gathered from FSDP2's shards), as a single run's does
    want, have = load_file(final_checkpoint(reference) / "model.safetensors"), load_file(final_checkpoint(run) /
                                                                                        "model.safetensors")
    assert sorted(have) == sorted(want)
    assert all(torch.allclose(have[k], want[k], atol=TOL) for k in want)
    ref_opt = torch.load(final_checkpoint(reference) / "state.pt", weights_only=True)["optimizer"]["state"]
    opt = torch.load(final_checkpoint(run) / "state.pt", weights_only=True)["optimizer"]["state"]
    assert opt.keys() == ref_opt.keys()
    assert all(torch.allclose(opt[k]["exp_avg_sq"], ref_opt[k]["exp_avg_sq"], atol=TOL) for k in ref_opt)


def test_fsdp_resumes_a_single_process_checkpoint(data: PreparedData, reference: Path, tmp_path: Path):
    """Checkpoints do not depend on the world size: a run paused single-process continues under FSDP2 (each rank
    keeps its shard of the whole optimizer state) on the same loss curve."""
    run = tmp_path / "run"
    res = train(ModelConfig(**MODEL), TrainConfig(**TRAIN), data, run, progress=False, stop_at=10)
    assert res.interrupted and res.step == 10
    proc = torchrun(data.path, "--out", run, *ARGS, "--train.parallel=fsdp", "--resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = curve(reference), curve(run)
    assert sorted(got) == list(range(1, 21))
    assert all(abs(got[s] - ref[s]) <= TOL for s in ref), [(s, got[s] - ref[s]) for s in ref]


def test_world_size_must_divide_batch(data: PreparedData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture):
    """Checked from torchrun's environment before any process group is created, so every rank fails alike."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="batch_size 3 is not divisible by the world size 2"):
        train(ModelConfig(**MODEL), TrainConfig(**{**TRAIN, "batch_size": 3}), data, tmp_path / "lib", progress=False)
    code = main(["train", str(data.path), "--out", str(tmp_path / "cli"), *ARGS, "--train.batch_size=5",
                 "--train.max_iters=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "not divisible by the world size 2" in err
    assert not torch.distributed.is_initialized()
    assert not (tmp_path / "lib").exists() and not (tmp_path / "cli").exists()


def test_batch_sampler_shards_the_global_batch(data: PreparedData):
    """Ranks draw the same starts and keep contiguous slices: together they are the single-process batch."""
    whole = BatchSampler(data.train, 6, 8, seed=3)
    shards = [BatchSampler(data.train, 6, 8, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(3):
        x, y = whole.next()
        parts = [s.next() for s in shards]
        assert all(p[0].shape == (2, 8) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ConfigError, match="not divisible"):
        BatchSampler(data.train, 6, 8, seed=3, rank=0, world_size=4)
