"""`tlm train` under torchrun (2 processes, gloo on CPU): DDP and FSDP2 follow the single-process loss curve of the
same global batch and write one run folder from rank 0; DDP checkpoints in the single-process format, FSDP2 in shards
that resume at any world size and consolidate into it; a lost rank ends the others with an error, not a hang."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_corpus
from transformer_lm import checkpoint as ckpt
from transformer_lm.api import load_run
from transformer_lm.cli import main
from transformer_lm.config import ModelConfig, TrainConfig
from transformer_lm.data import PreparedData, load_prepared, prepare
from transformer_lm.errors import CheckpointError, ConfigError
from transformer_lm.model import Transformer
from transformer_lm.tokenizers import build_tokenizer
from transformer_lm.train import read_metrics, train
from transformer_lm.windows import BatchSampler

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


def torchrun(*argv: str | Path, nproc: int = 2, script: Path | None = None) -> subprocess.CompletedProcess:
    """`tlm train ...` (or `script ...`) started by PyTorch's launcher on this machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    target = [str(script)] if script else ["-m", "transformer_lm.cli", "train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *target, *map(str, argv)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def curve(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if key in r}


def final_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / "step-0000020"


def test_ddp_matches_single_process(data: PreparedData, reference: Path, tmp_path: Path):
    run = tmp_path / "ddp"
    proc = torchrun(data.path, "--out", run, *ARGS, "--train.parallel=ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"{run}: 20 steps") == 1  # rank 0 alone reports
    assert len(read_metrics(run / "metrics.jsonl")) == len(read_metrics(reference / "metrics.jsonl"))  # one writer
    ref, got = curve(reference), curve(run)
    assert sorted(got) == list(range(1, 21))
    assert all(abs(got[s] - ref[s]) <= TOL for s in ref), [(s, got[s] - ref[s]) for s in ref]
    ref_val, got_val = curve(reference, "val_loss"), curve(run, "val_loss")
    assert sorted(got_val) == [10, 20] and all(abs(got_val[s] - ref_val[s]) <= TOL for s in ref_val)
    # the checkpoint holds whole weights and optimizer state, as a single run's does
    want, have = load_file(final_checkpoint(reference) / "model.safetensors"), load_file(final_checkpoint(run) /
                                                                                        "model.safetensors")
    assert sorted(have) == sorted(want)
    assert all(torch.allclose(have[k], want[k], atol=TOL) for k in want)
    ref_opt = torch.load(final_checkpoint(reference) / "state.pt", weights_only=True)["optimizer"]["state"]
    opt = torch.load(final_checkpoint(run) / "state.pt", weights_only=True)["optimizer"]["state"]
    assert opt.keys() == ref_opt.keys()
    assert all(torch.allclose(opt[k]["exp_avg_sq"], ref_opt[k]["exp_avg_sq"], atol=TOL) for k in ref_opt)


@pytest.mark.parametrize("quantized", [[], ["--train.lora_quantize=int8"]], ids=["lora", "qlora"])
def test_ddp_lora_fine_tune_on_conversations_matches_single_process(tmp_path: Path, quantized: list[str]):
    """The newer training paths under DDP: LoRA (frozen weights, adapters synchronised; QLoRA's quantized too, each
    rank quantizing alike) on conversations (the masked sampler: every rank draws every row, then keeps its share)
    follow the single-process curve."""
    corpus = tmp_path / "base.txt"
    corpus.write_text(make_corpus())
    base = tmp_path / "base"
    assert main(["train", str(corpus), "--out", str(base), *ARGS, "--train.max_iters=10"]) == 0
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"alpha {i}"},
                                                      {"role": "assistant", "content": f"beta {i * 3}"}]}) + "\n"
                             for i in range(20)))
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>\n{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    args = [chats, "--train.init_from", base, "--chat_template", template, "--train.lora_rank=4", "--train.lr=1e-2",
            *quantized, *[a for a in ARGS if not a.startswith("--model.")]]
    assert main(["train", *map(str, args), "--out", str(tmp_path / "one")]) == 0
    proc = torchrun(*args, "--out", tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert sorted(got) == list(range(1, 21))
    assert all(abs(got[s] - ref[s]) <= TOL for s in ref), [(s, got[s] - ref[s]) for s in ref]
    assert abs(curve(tmp_path / "two", "val_loss")[20] - curve(tmp_path / "one", "val_loss")[20]) <= TOL


@pytest.mark.parametrize("lora", [[], ["--train.lora_rank=4"]], ids=["full", "lora"])
def test_ddp_dpo_matches_single_process(tmp_path: Path, lora: list[str]):
    """DPO under DDP: each rank scores its share of the step's pairs (both rows of each) against the reference, a
    frozen copy or the adapters off; loss and reward accuracy follow one process's."""
    corpus = tmp_path / "base.txt"
    corpus.write_text(make_corpus())
    base = tmp_path / "base"
    assert main(["train", str(corpus), "--out", str(base), *ARGS, "--train.max_iters=10"]) == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"n{i}=", "chosen": f"{i % 7} ok", "rejected": f"{i % 5}"}) + "\n"
                             for i in range(30)))
    args = [pairs, "--train.init_from", base, "--train.lr=1e-2", *lora,
            *[a for a in ARGS if not a.startswith("--model.")]]
    assert main(["train", *map(str, args), "--out", str(tmp_path / "one")]) == 0
    proc = torchrun(*args, "--out", tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("loss", "reward_accuracy", "reward_margin", "val_loss"):
        ref, got = curve(tmp_path / "one", key), curve(tmp_path / "two", key)
        assert sorted(got) == sorted(ref) and all(abs(got[s] - ref[s]) <= TOL for s in ref), (key, ref, got)


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


def test_two_nodes_by_c10d_rendezvous(data: PreparedData, reference: Path, tmp_path: Path):
    """README's two-node command shape, both "nodes" on this machine: two torchrun agents (--nnodes 2, one process
    each, --node_rank 0/1) meet at a c10d rendezvous endpoint. Both processes have LOCAL_RANK 0, so anything keyed on
    the local rank instead of the global one (who writes the run folder, who logs) would show up here."""
    run, port = tmp_path / "two-nodes", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def agent(node: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
             "--rdzv_id", "tlm-test", "-m", "transformer_lm.cli", "train", str(data.path), "--out", str(run), *ARGS,
             "--train.parallel=fsdp"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # On one machine both agents match the endpoint's host, and whichever binds the port first hosts the rendezvous
    # store; node 0 starts first and hosts it, as the endpoint's machine would.
    agents = [agent(0)]
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and agents[0].poll() is None, agents[0].communicate()[1][-2000:]
            time.sleep(0.1)
    agents.append(agent(1))
    try:
        outputs = [agent.communicate(timeout=180) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert [a.returncode for a in agents] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum(out.count(f"{run}: 20 steps") for out, _ in outputs) == 1  # one report, from global rank 0
    assert_same_curve(run, reference)
    assert (final_checkpoint(run) / ckpt.SHARDS).is_dir()  # both nodes' shards in the one run folder


def test_slurm_script_with_stand_in_srun(data: PreparedData, reference: Path, tmp_path: Path):
    """scripts/train.sbatch as a SLURM job of two nodes would run it, with stand-ins for the two SLURM commands it
    calls: `scontrol show hostnames` names this machine twice, `srun` starts the script's torchrun once per "node"
    with SLURM's per-task variables. The torchrun line, its rendezvous and the tlm arguments are the script's own."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf '127.0.0.1\\n127.0.0.1\\n'\n")
    # Task 0 first, the others once its agent listens: on the head node alone the endpoint's host is the machine's
    # own, so its agent hosts the rendezvous store.
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nfor node in $(seq 0 $((SLURM_NNODES - 1))); do\n"
        "  SLURM_NODEID=$node SLURM_PROCID=$node \"$@\" &\n  pids+=($!)\n"
        "  until (exec 3<>/dev/tcp/127.0.0.1/$RDZV_PORT) 2>/dev/null; do sleep 0.1; done\ndone\n"
        "rc=0; for p in \"${pids[@]}\"; do wait \"$p\" || rc=$?; done; exit $rc\n")
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    run = tmp_path / "slurm"
    path = f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"  # the stand-ins, then this venv's torchrun
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path,
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[0-1]", "GPUS_PER_NODE": "1",
           "RDZV_PORT": str(free_port())}
    script = Path(__file__).parents[1] / "scripts" / "train.sbatch"
    proc = subprocess.run(["bash", str(script), str(data.path), "--out", str(run), *ARGS, "--train.parallel=ddp"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"{run}: 20 steps") == 1
    assert_same_curve(run, reference)


SCRIPT = Path(__file__).with_name("dist_train.py")


def spec(**extra) -> str:
    return json.dumps({"model": MODEL, "train": {**TRAIN, "parallel": "fsdp"}, **extra})


def assert_same_curve(run: Path, reference: Path) -> None:
    ref, got = curve(reference), curve(run)
    assert sorted(got) == list(range(1, 21))
    assert all(abs(got[s] - ref[s]) <= TOL for s in ref), [(s, got[s] - ref[s]) for s in ref]


@pytest.fixture(scope="module")
def paused_fsdp(data: PreparedData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An FSDP2 run on 2 processes, paused after step 10: its checkpoint is the shards of the 2 ranks."""
    run = tmp_path_factory.mktemp("fsdp") / "run"
    proc = torchrun(data.path, run, spec(stop_at=10), script=SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def resumable_copy(paused: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(paused, run)
    return run


def test_fsdp_checkpoint_is_sharded(paused_fsdp: Path, reference: Path):
    folder = ckpt.latest_checkpoint(paused_fsdp)
    assert folder.name == "step-0000010" and ckpt.is_sharded(folder)
    assert sorted(p.name for p in (folder / ckpt.SHARDS).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (folder / "model.safetensors").exists()  # no rank gathered the whole weights
    assert "optimizer" not in ckpt.load_state(folder)  # it is in the shards; the sampler, RNG and step are here
    ref = curve(reference)
    assert all(abs(curve(paused_fsdp)[s] - ref[s]) <= TOL for s in range(1, 11))


def test_sharded_checkpoint_resumes_on_two_processes_and_consolidates(data: PreparedData, paused_fsdp: Path,
                                                                      reference: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture):
    run = resumable_copy(paused_fsdp, tmp_path)
    proc = torchrun(data.path, "--out", run, *ARGS, "--train.parallel=fsdp", "--resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_curve(run, reference)
    folder = ckpt.latest_checkpoint(run)
    assert folder.name == "step-0000020" and ckpt.is_sharded(folder)
    want = load_file(final_checkpoint(reference) / "model.safetensors")
    in_memory = load_run(run, "cpu").model.state_dict()  # read whole from the shards, before any consolidation
    assert all(torch.allclose(in_memory[k], want[k], atol=TOL) for k in want)
    assert main(["consolidate", str(run)]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    have = load_file(folder / "model.safetensors")
    assert sorted(have) == sorted(want)
    assert all(torch.allclose(have[k], want[k], atol=TOL) for k in want)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert main(["consolidate", str(run)]) == 0  # already consolidated: left as it is
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    (folder / "model.safetensors").write_bytes(b"\x07" * 64)  # damaged: rebuilt from the shards, not reported whole
    assert main(["consolidate", str(run)]) == 0
    have = load_file(folder / "model.safetensors")
    assert all(torch.allclose(have[k], want[k], atol=TOL) for k in want)
    assert main(["sample", str(run), "def", "--max_new_tokens", "4", "--seed", "0", "--device", "cpu"]) == 0


def test_sharded_checkpoint_resumes_in_one_process(data: PreparedData, paused_fsdp: Path, reference: Path,
                                                   tmp_path: Path):
    """No process group at all: the 2 ranks' shards are read whole into one process's model and optimizer."""
    run = resumable_copy(paused_fsdp, tmp_path)
    res = train(ModelConfig(**MODEL), TrainConfig(**{**TRAIN, "parallel": "fsdp"}), data, run, resume=True,
                progress=False)
    assert res.step == 20 and not res.interrupted
    assert_same_curve(run, reference)
    want, have = (load_file(final_checkpoint(r) / "model.safetensors") for r in (reference, run))
    assert all(torch.allclose(have[k], want[k], atol=TOL) for k in want)
    ref_opt = torch.load(final_checkpoint(reference) / "state.pt", weights_only=True)["optimizer"]["state"]
    opt = torch.load(final_checkpoint(run) / "state.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.allclose(opt[k]["exp_avg_sq"], ref_opt[k]["exp_avg_sq"], atol=TOL) for k in ref_opt)


def test_sharded_checkpoint_without_its_metadata_is_one_error(data: PreparedData, paused_fsdp: Path, tmp_path: Path):
    """`cp shards/*` leaves out the .metadata dotfile: the checkpoint was taken for a whole one ("missing weights
    file model.safetensors"), or with a consolidated model.safetensors beside it, a KeyError traceback."""
    run = resumable_copy(paused_fsdp, tmp_path)
    folder = ckpt.latest_checkpoint(run)
    assert main(["consolidate", str(run)]) == 0  # the whole weights beside the shards
    whole = (folder / "model.safetensors").rename(tmp_path / "model.safetensors")
    (folder / ckpt.SHARDS / ".metadata").unlink()
    for consolidated in (False, True):
        if consolidated:
            whole.rename(folder / "model.safetensors")
        with pytest.raises(CheckpointError, match=r"\.metadata is missing or corrupt"):
            train(ModelConfig(**MODEL), TrainConfig(**{**TRAIN, "parallel": "fsdp"}), data, run, resume=True,
                  progress=False)


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_four_processes(data: PreparedData, paused_fsdp: Path, reference: Path,
                                                      tmp_path: Path):
    run = resumable_copy(paused_fsdp, tmp_path)
    proc = torchrun(data.path, "--out", run, *ARGS, "--train.parallel=fsdp", "--resume=true", nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_curve(run, reference)


def test_crash_mid_sharded_save_leaves_previous_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The shards go into the temporary step folder: a crash while writing them leaves `latest` where it was."""
    model = Transformer(ModelConfig(**{**MODEL, "vocab_size": 19})).init_weights(0)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt.save_checkpoint(tmp_path, model, {"step": 1}, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real_save = ckpt.dcp.save

    def crash(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)
        (Path(checkpoint_id) / ".metadata").write_bytes(b"half")
        raise OSError("simulated crash")

    monkeypatch.setattr(ckpt.dcp, "save", crash)
    tmp = ckpt.begin_checkpoint(tmp_path, 2)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_shards(tmp, model, optimizer)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000001"
    clone = Transformer(model.config)
    ckpt.load_weights(clone, ckpt.latest_checkpoint(tmp_path))
    assert all(torch.equal(before[k], v) for k, v in clone.state_dict().items())
    tmp = ckpt.begin_checkpoint(tmp_path, 2)  # the next save starts over and commits
    ckpt.save_shards(tmp, model, optimizer)
    folder = ckpt.commit_checkpoint(tmp_path, tmp, 2, {"step": 2})
    assert ckpt.latest_checkpoint(tmp_path) == folder and ckpt.is_sharded(folder)
    ckpt.load_weights(clone, folder)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in clone.state_dict().items())
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == ["step-0000002"]
    shard = folder / ckpt.SHARDS / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:64])  # DCP keeps no checksums: a cut inside the tensors read fails
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        ckpt.load_weights(clone, folder)
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        ckpt.load_shards(folder, model, optimizer)


@pytest.mark.parametrize("how", ["killed", pytest.param("hung", marks=pytest.mark.slow)])
def test_lost_rank_ends_the_others_with_an_error(data: PreparedData, tmp_path: Path, how: str):
    """Rank 1 dies (SIGKILL) or hangs (SIGSTOP) mid-run: rank 0 fails the next collective — at once when the
    connection drops, after train.dist_timeout when the peer is silent — and exits with one error line, no hang.
    The ranks are started without torchrun, whose agent would otherwise end the survivor itself."""
    timeout = 5
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2"}
    cmd = [sys.executable, "-m", "transformer_lm.cli", "train", str(data.path), "--out", str(tmp_path / "run"),
           *ARGS, "--train.max_iters=100000", "--train.eval_interval=100000", f"--train.dist_timeout={timeout}"]
    ranks = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        metrics, start = tmp_path / "run" / "metrics.jsonl", time.monotonic()
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert time.monotonic() - start < 90 and ranks[0].poll() is None, ranks[0].stderr.read()[-2000:]
            time.sleep(0.1)
        ranks[1].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        lost = time.monotonic()
        _, err = ranks[0].communicate(timeout=timeout + 30)
        waited = time.monotonic() - lost
    finally:
        for p in ranks:
            p.kill()
            p.communicate()
    assert ranks[0].returncode == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("tlm: error")]
    assert len(lines) == 1 and "rank 0 of 2: another rank died or stopped answering" in lines[0], err[-2000:]
    assert waited < (timeout if how == "killed" else timeout + 10), waited  # killed: no waiting for the timeout


@pytest.mark.parametrize("started", [True, False])
def test_leave_ends_a_worker_that_ran_a_process_group(started: bool):
    """A worker that ran a process group ends at once with its status and its output flushed (a pipe's buffered
    stdout would otherwise be lost with os._exit); any other process goes on to exit normally."""
    script = ("import atexit, transformer_lm.parallel as p\n"
              "atexit.register(print, 'finalized')\n"
              f"p._started_group = {started}\n"
              "print('report')\n"
              "p.leave(3)\n"
              "raise SystemExit(0)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.split()) == ((3, ["report"]) if started else (0, ["report", "finalized"]))


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


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_policy(data: PreparedData, tmp_path: Path):
    """--train.dtype bfloat16 under FSDP2: blocks computed in bf16 by the MixedPrecisionPolicy, gradients reduced and
    master weights kept in fp32 — the loss curve follows a single-process bf16-autocast run up to bf16 rounding, and
    the checkpointed weights are fp32."""
    ref = tmp_path / "ref"
    train(ModelConfig(**MODEL), TrainConfig(**{**TRAIN, "dtype": "bfloat16"}), data, ref, progress=False)
    run = tmp_path / "fsdp"
    proc = torchrun(data.path, "--out", run, *ARGS, "--train.parallel=fsdp", "--train.dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = curve(ref), curve(run)
    assert sorted(got) == list(range(1, 21))
    assert all(abs(got[s] - want[s]) <= 0.05 for s in want), [(s, got[s] - want[s]) for s in want]
    assert got[20] < got[1] - 0.1  # it trains
    weights = api_weights(run)
    assert weights and all(t.dtype == torch.float32 for t in weights.values())


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_compiled_data_parallel_follows_the_single_process_curve(data: PreparedData, reference: Path, tmp_path: Path,
                                                                  parallel: str):
    """--train.compile under torchrun: DDP wraps the compiled model, FSDP2 shards compiled blocks (parallelize's order).
    Compiled kernels round differently from eager ones, so the curve must follow the eager single-process one to
    1e-3 rather than 1e-5; the run must also actually have trained compiled (no eager fallback warning)."""
    run = tmp_path / parallel
    proc = torchrun(data.path, "--out", run, *ARGS, f"--train.parallel={parallel}", "--train.compile=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.compile does not work here" not in proc.stderr
    want, got = curve(reference), curve(run)
    assert sorted(got) == list(range(1, 21))
    assert all(abs(got[s] - want[s]) <= 1e-3 for s in want), [(s, got[s] - want[s]) for s in want]


def api_weights(run: Path) -> dict[str, torch.Tensor]:
    """The run's latest weights, consolidated from the shards in memory."""
    return load_run(run, device="cpu").model.state_dict()
