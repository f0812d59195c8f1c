"""Training loop, checkpoints and resume: the properties a user relies on when a run is interrupted."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from transformer_lm import checkpoint as ckpt
from transformer_lm import data as data_module
from transformer_lm.api import Run, load_run
from transformer_lm.config import ModelConfig, TrainConfig
from transformer_lm.errors import CheckpointError, ConfigError, DivergenceError, RunExistsError
from transformer_lm.model import Transformer
from transformer_lm.optim import lr_at
from transformer_lm.train import Budget, _eval_bytes_per_token, plot_losses, read_metrics, train
from transformer_lm.train_data import training_data
from transformer_lm.windows import BatchSampler

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.1)


def small_train(**kw) -> TrainConfig:
    base = dict(batch_size=4, max_iters=12, eval_interval=5, eval_batches=2, log_interval=1, warmup_iters=3, lr=3e-3)
    return TrainConfig(**{**base, **kw})


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_iters=10, max_iters=110)
    assert lr_at(0, 0.0, cfg) == pytest.approx(0.1)
    assert lr_at(9, 0.0, cfg) == pytest.approx(1.0)
    budget = Budget(cfg, tokens_per_step=1)
    mid = lr_at(60, budget.progress(60, 0.0), cfg)
    assert mid == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 0.9)
    assert lr_at(110, budget.progress(110, 0.0), cfg) == pytest.approx(0.1)


def test_budget_by_tokens_and_time(caplog):
    assert Budget(TrainConfig(max_iters=None, max_tokens=1000), tokens_per_step=64).max_steps == 16
    # resumed at step 10 after 640 tokens with a batch twice as large: 360 tokens (3 steps) are left, not 6 steps
    assert Budget(TrainConfig(max_iters=None, max_tokens=1000), 128, step=10, tokens=640).max_steps == 13
    b = Budget(TrainConfig(max_iters=None, max_time=2.0), tokens_per_step=64)
    assert not b.done(10**6, 1.9) and b.done(1, 2.0)
    with caplog.at_level("WARNING", logger="transformer_lm"):  # the default max_iters cutting a token budget short
        assert Budget(TrainConfig(max_tokens=10**6), tokens_per_step=64).max_steps == 2000
    assert "--train.max_iters null" in caplog.text


def test_a_warmup_as_long_as_the_run_is_warned_of(caplog):
    """`--train.max_iters 50` with the default 100 warmup steps trained at rising rates only, ending at half the
    peak, with no word; the last step's lr is the fraction the warning names."""
    cfg = TrainConfig(lr=1.0, max_iters=50)
    with caplog.at_level("WARNING", logger="transformer_lm"):
        Budget(cfg, tokens_per_step=1)
    assert "never decays" in caplog.text and "0.5 of its peak" in caplog.text
    assert lr_at(49, 0.0, cfg) == pytest.approx(0.5)
    caplog.clear()
    with caplog.at_level("WARNING", logger="transformer_lm"):
        Budget(TrainConfig(max_iters=101), tokens_per_step=1)
    assert "warmup" not in caplog.text


def test_time_and_iteration_budgets_measure_progress_alike():
    """Both count the budget after warmup (the time budget estimating warmup's seconds at the mean step time): with a
    steady 0.1 s step, 1000 steps or 100 s place a wsd cooldown alike, and both end exactly at the budget's end."""
    cfg = dict(warmup_iters=100, schedule="wsd", cooldown_fraction=0.2)
    steps = Budget(TrainConfig(max_iters=1000, **cfg), 1)
    clock = Budget(TrainConfig(max_iters=None, max_time=100.0, **cfg), 1)
    for step in (100, 550, 800, 1000):
        assert clock.progress(step, step * 0.1) == pytest.approx(steps.progress(step, 0.0)), step
    assert steps.progress(100, 0.0) == 0 and steps.progress(820, 0.0) == pytest.approx(0.8)  # cooldown: last 180
    assert clock.progress(37, 100.0) == 1.0  # a slower run still ends its schedule with the clock


def test_train_writes_complete_run_folder(corpus_file: Path, tmp_path: Path):
    data = training_data(corpus_file, "char")
    res = train(ModelConfig(**SMALL), small_train(), data, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert res.step == 12 and not res.interrupted
    for name in ("config.json", "tokenizer.json", "env.json", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    env = json.loads((run / "env.json").read_text())
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or env["versions"]["torch"]
    records = read_metrics(run / "metrics.jsonl")
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10, 12]
    assert all(r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"])) for r in evals)
    # bits per byte over the tokens evaluated (2 batches of 4 windows of 16 from the split's start): loss/ln2 * tokens
    # / their UTF-8 bytes
    n = evals[-1]["val_tokens"]
    assert n == 2 * 4 * 16
    text = data.tokenizer.decode(data.val[1 : n + 1].tolist())
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] / math.log(2) * n / len(text.encode("utf-8")))
    loaded = load_run(run, "cpu")
    assert loaded.step == 12 and loaded.model.config.vocab_size == data.tokenizer.vocab_size


def test_bits_per_byte_counts_the_bytes_of_the_tokens_evaluated(tmp_path: Path):
    """An ASCII start of the val split is evaluated, 2-byte characters follow: the split's mean bytes per token (1.5)
    gave a bpb a third too low."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox " * 450 + "a" * 500 + "é" * 500, encoding="utf-8")  # val: 500 a, 500 é
    data = training_data(corpus, "char")
    assert data.manifest["val_bytes"] == 1500 and data.manifest["val_tokens"] == 1000
    res = train(ModelConfig(**SMALL), small_train(max_iters=2, eval_interval=2), data, tmp_path / "run",
                progress=False)
    assert res.val.tokens == 128 and res.val.bpb == pytest.approx(res.val.loss / math.log(2))  # 1 byte a token


def test_a_whole_split_scores_the_bytes_of_its_predicted_tokens(tmp_path: Path):
    """bpb = summed nats / ln 2 / bytes of the tokens predicted. A prepared val split (`tlm eval --data FOLDER`, and
    training's evaluation when it covers the split) counted its first token's bytes, never predicted: here a
    2-byte first character and 9 ASCII ones gave a bpb 9 % below its own text's."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("a" * 90 + "é" + "b" * 9, encoding="utf-8")  # val: the last 10 characters
    data = training_data(corpus, "char")
    assert data.manifest["val_bytes"] == 11 and data.manifest["val_tokens"] == 10
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=data.tokenizer.vocab_size, block_size=4, n_layer=1, n_head=2,
                                    n_embd=16)).eval()
    run = Run(tmp_path, {}, model, data.tokenizer, 0)
    val_text = tmp_path / "val.txt"
    val_text.write_text("é" + "b" * 9, encoding="utf-8")
    nll, ids = 0.0, torch.tensor(data.val.tolist())
    with torch.no_grad():  # windows of 4 predicted tokens from 0, 4, 8, each token once
        for start in range(0, len(ids) - 1, 4):
            window = ids[start : start + 5]
            nll += float(torch.nn.functional.cross_entropy(model(window[None, :-1]).logits[0], window[1:],
                                                           reduction="sum"))
    expected = nll / math.log(2) / len(("b" * 9).encode())  # the predicted tokens: the 9 b's
    for result in (run.evaluate(data.path), run.evaluate(val_text)):
        assert result.tokens == 9 and result.bpb == pytest.approx(expected, rel=1e-6)
    assert _eval_bytes_per_token(data, 8, 4, 100) == 1.0  # training's evaluation of the whole split


def test_the_loss_plot_leaves_the_callers_matplotlib_alone(tmp_path: Path):
    """loss.png was drawn through pyplot after matplotlib.use("Agg"): a notebook that called train() had its backend
    switched and could no longer show its own plots; and a run folder named like `$\\q$` (mathtext) stopped a
    finished run with a parse error."""
    import matplotlib

    run = tmp_path / "cost$\\q$"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                               [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "val_loss": 1.7}]))
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend of the caller's own, as a notebook's inline one is
    try:
        plot_losses(run / "metrics.jsonl", run / "loss.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_raw_text_is_prepared_once_and_again_after_any_edit(tmp_path: Path):
    """The cache is keyed by path, size and times: an edit that keeps the size and modification time (`cp -p`,
    `rsync -a`) still changes the change time, and was served the old text before."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefgh" * 100)
    first = training_data(corpus, "char")
    assert training_data(corpus, "char").path == first.path  # reused
    st = corpus.stat()
    corpus.write_text("hgfedcba" * 100)  # same size
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same modification time
    again = training_data(corpus, "char")
    assert again.path != first.path and again.tokenizer.decode(again.train[:8].tolist()) == "hgfedcba"


def test_a_cache_entry_of_an_older_preparation_is_not_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Entries prepared before a change to how text becomes ids (session 14's chunk cut) were trained on as they
    were: the key carries train_data.CACHE_VERSION, so an entry written under another version is prepared again."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefgh" * 100)
    old = training_data(corpus, "char")
    data_module = sys.modules["transformer_lm.train_data"]
    monkeypatch.setattr(data_module, "CACHE_VERSION", data_module.CACHE_VERSION + 1)
    new = training_data(corpus, "char")
    assert new.path != old.path and old.path.is_dir()  # the old entry is left for the runs that recorded it
    assert new.train.tolist() == old.train.tolist()


def test_raw_text_prepared_meanwhile_by_another_run_is_used(tmp_path: Path):
    """Two runs started together on the same raw text both prepare it; the one that finishes second used to replace
    the first's cache folder (which that run may be loading) and now uses it."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefgh" * 100)
    encoded, other = data_module._encoded, {}

    def other_run_first(pieces, *args):
        if not other:  # the other run, started at the same moment, finishes its prepare first
            other["started"] = True
            other["data"] = training_data(corpus, "char")
        yield from encoded(pieces, *args)

    with mock.patch.object(data_module, "_encoded", other_run_first):
        data = training_data(corpus, "char")
    assert data.path == other["data"].path and data.train.tolist() == other["data"].train.tolist()


def test_training_reduces_loss(corpus_file: Path, tmp_path: Path):
    data = training_data(corpus_file, "byte")
    cfg = small_train(max_iters=60, eval_interval=60, log_interval=10)
    train(ModelConfig(**{**SMALL, "dropout": 0.0}), cfg, data, tmp_path / "run", progress=False)
    curve = losses(tmp_path / "run")
    assert curve[60] < 0.65 * curve[1]  # from ~ln(256) = 5.5 to well below


def test_checkpoint_round_trip(tmp_path: Path):
    model = Transformer(ModelConfig(**SMALL)).init_weights(0)
    state = {"step": 3, "optimizer": {"x": torch.arange(4)}}
    ckpt.save_checkpoint(tmp_path, model, state, 3)
    clone = Transformer(ModelConfig(**SMALL))
    ckpt.load_weights(clone, ckpt.latest_checkpoint(tmp_path))
    for (k, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b), k
    assert clone.lm_head.weight is clone.tok_emb.weight  # tying survives loading
    assert torch.equal(ckpt.load_state(ckpt.latest_checkpoint(tmp_path))["optimizer"]["x"], torch.arange(4))


@pytest.mark.parametrize("crash_at", ["weights", "state", "rename", "pointer"])
def test_crash_mid_checkpoint_leaves_previous_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at):
    model = Transformer(ModelConfig(**SMALL)).init_weights(0)
    ckpt.save_checkpoint(tmp_path, model, {"step": 1}, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def boom(*a, **k):
        raise OSError("simulated crash")

    if crash_at == "weights":
        monkeypatch.setattr(ckpt, "save_file", lambda tensors, path, metadata=None: (
            Path(path).write_bytes(b"\x00" * 100), boom()))
    elif crash_at == "state":
        monkeypatch.setattr(ckpt.torch, "save", boom)
    elif crash_at == "rename":
        monkeypatch.setattr(ckpt.os, "replace", boom)
    else:
        monkeypatch.setattr(ckpt, "atomic_write_text", boom)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(tmp_path, model, {"step": 2}, 2)
    monkeypatch.undo()
    folder = ckpt.latest_checkpoint(tmp_path)
    assert folder.name == "step-0000001"
    clone = Transformer(ModelConfig(**SMALL))
    ckpt.load_weights(clone, folder)
    assert all(torch.equal(before[k], v) for k, v in clone.state_dict().items())
    ckpt.save_checkpoint(tmp_path, model, {"step": 2}, 2)  # and the next save recovers
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000002"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == ["step-0000002"]


def test_a_crash_after_the_pointer_moved_leaks_no_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Killed between moving `latest` and deleting the previous checkpoint (or mid-save, leaving a temporary
    folder): only that previous one was ever deleted, so the leftovers stayed for good, a full checkpoint each."""
    model = Transformer(ModelConfig(**SMALL)).init_weights(0)
    ckpt.save_checkpoint(tmp_path, model, {"step": 1}, 1)

    real_rmtree = ckpt.shutil.rmtree

    def killed(path, *a, **k):
        if Path(path).name == "step-0000001":  # the previous checkpoint, once `latest` names step 2
            raise KeyboardInterrupt
        real_rmtree(path, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(ckpt.shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save_checkpoint(tmp_path, model, {"step": 2}, 2)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000002"
    (tmp_path / "checkpoints" / ".step-0000003.tmp").mkdir()  # a save of step 3 killed mid-write
    ckpt.save_checkpoint(tmp_path, model, {"step": 4}, 4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-0000004"]


def test_truncated_or_corrupt_weights_raise(tmp_path: Path):
    model = Transformer(ModelConfig(**SMALL)).init_weights(0)
    folder = ckpt.save_checkpoint(tmp_path, model, {"step": 1}, 1)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ckpt.load_weights(Transformer(ModelConfig(**SMALL)), folder)
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ckpt.load_weights(Transformer(ModelConfig(**SMALL)), folder)
    with pytest.raises(CheckpointError, match="do not fit"):
        ckpt.load_weights(Transformer(ModelConfig(**SMALL)), ckpt.save_checkpoint(
            tmp_path / "other", Transformer(ModelConfig(**{**SMALL, "n_embd": 64})).init_weights(0), {}, 1))


def test_resume_continues_exactly(corpus_file: Path, tmp_path: Path):
    """An interrupted run, resumed, logs the same per-step losses as an uninterrupted one (dropout on, so the RNG
    state matters too)."""
    data = training_data(corpus_file, "char")
    full = train(ModelConfig(**SMALL), small_train(), data, tmp_path / "full", progress=False)
    # interrupt at step 7 (after the step-5 checkpoint the interrupted run logged steps 6-7, which resume drops)
    half = train(ModelConfig(**SMALL), small_train(max_iters=12), data, tmp_path / "half", progress=False,
                 stop_at=7)
    assert half.interrupted and half.step == 7
    resumed = train(ModelConfig(**SMALL), small_train(), data, tmp_path / "half", resume=True, progress=False)
    assert resumed.step == full.step == 12
    assert losses(tmp_path / "half") == losses(tmp_path / "full")
    assert resumed.val.loss == full.val.loss


def test_a_batch_the_memory_plan_says_cannot_fit_is_refused_before_training(corpus_file: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch):
    """A batch too large for the host was granted by Linux's overcommit and the OOM killer ended the run in its
    first step, without a word. Now the planned peak (`tlm memory`'s plan) is compared with the free memory first."""
    from transformer_lm import runtime
    from transformer_lm.experiments.memory import plan_memory
    from transformer_lm.optim import fused_adamw

    data = training_data(corpus_file, "char")
    model = ModelConfig(**{**SMALL, "vocab_size": data.tokenizer.vocab_size})
    need = plan_memory(model, 4, dtype="float32", fused_optimizer=fused_adamw(torch.device("cpu"))).peak  # fp32
    monkeypatch.setattr(runtime, "free_memory", lambda device: need - 1)
    with pytest.raises(ConfigError, match=r"training 4 sequences of 16 tokens .* needs 0\.0 GiB, more than the 0\.0 "
                                          r"GiB free on cpu; lower --train.batch_size"):
        train(model, small_train(), data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(runtime, "free_memory", lambda device: need)
    assert train(model, small_train(max_iters=2), data, tmp_path / "run", progress=False).step == 2


def test_ctrl_c_in_the_last_step_ends_a_complete_run(corpus_file: Path, tmp_path: Path):
    """Ctrl-C during the last step (here: train's stop_at, which behaves as Ctrl-C) was reported as an interruption
    to resume (exit 130), and loss.png was never drawn, although every step had run and was checkpointed."""
    data = training_data(corpus_file, "char")
    res = train(ModelConfig(**SMALL), small_train(), data, tmp_path / "run", progress=False, stop_at=12)
    assert not res.interrupted and res.step == 12 and res.val is not None
    assert (tmp_path / "run" / "loss.png").is_file()
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(tmp_path / "run")) == 12


def test_resume_with_new_settings_counts_tokens_and_records_the_settings(corpus_file: Path, tmp_path: Path):
    """Resumed with a doubled batch, the token count adds up what each step trained (it was step × the new batch), a
    token budget ends on the tokens really trained, config.json takes the new settings (a later --resume fell back
    to the first ones), and a metrics line cut short by a kill does not stop the resume."""
    data = training_data(corpus_file, "char")
    run = tmp_path / "run"
    cfg = small_train(max_iters=None, max_tokens=16 * 64, eval_interval=100)  # 16 steps of 4 × 16 tokens
    train(ModelConfig(**SMALL), cfg, data, run, progress=False, stop_at=4)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "tok')  # killed mid-write
    res = train(ModelConfig(**SMALL), small_train(max_iters=None, max_tokens=16 * 64, batch_size=8,
                                                  eval_interval=100), data, run, resume=True, progress=False)
    assert res.tokens == 16 * 64 and res.step == 4 + 6  # 4 steps of 64 tokens, then 6 of 128
    records = read_metrics(run / "metrics.jsonl")
    assert [r["tokens"] for r in records if "loss" in r][-1] == 16 * 64
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))
    assert json.loads((run / "config.json").read_text())["train"]["batch_size"] == 8


def test_validation_covers_the_same_tokens_however_the_batch_is_split(corpus_file: Path, tmp_path: Path):
    data = training_data(corpus_file, "char")
    seen = {}
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        res = train(ModelConfig(**SMALL), small_train(max_iters=1, batch_size=batch, grad_accum=accum), data,
                    tmp_path / f"b{batch}", progress=False)
        seen[batch] = res.val.tokens
    assert seen == {4: 2 * 4 * 16, 2: 2 * 4 * 16, 1: 2 * 4 * 16}  # eval_batches 2 of 4 sequences each


def test_accumulated_micro_batches_step_like_one_naive_batch(corpus_file: Path, tmp_path: Path):
    """grad_accum=3 micro-batches of 2 sequences give the update of one 6-sequence batch written out in float64:
    cross-entropy of the full logits, the global norm clipped (and reported before clipping), AdamW with decay on the
    blocks' matrices only (the head is tied to the embedding), the logged loss the mean over the 6 sequences."""
    data = training_data(corpus_file, "char")
    model_cfg = ModelConfig(**{**SMALL, "dropout": 0.0, "vocab_size": data.tokenizer.vocab_size})
    cfg = small_train(batch_size=2, grad_accum=3, max_iters=2, warmup_iters=0, lr=1e-2, grad_clip=0.05)
    res = train(model_cfg, cfg, data, tmp_path / "run", progress=False)
    logged = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if "loss" in r]
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg).init_weights(cfg.seed).double()
    sampler = BatchSampler(data.train, 2, model_cfg.block_size, seed=cfg.seed)
    decay = [p for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
    rest = [p for p in model.parameters() if all(p is not q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
                            betas=(cfg.beta1, cfg.beta2), foreach=False)
    for step, lr in enumerate((cfg.lr * 0.55, cfg.lr * 0.1)):  # cosine at progress 1/2 and 1 of 2 steps
        x, y = (torch.cat(t) for t in zip(*(sampler.next() for _ in range(3))))
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad()
        assert logged[step]["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert logged[step]["grad_norm"] == pytest.approx(norm.item(), rel=1e-5) and norm > 10 * cfg.grad_clip
        assert logged[step]["lr"] == pytest.approx(lr, rel=1e-12)
    trained = load_run(res.run_dir).model.state_dict()
    for name, want in model.state_dict().items():
        torch.testing.assert_close(trained[name], want.float(), rtol=0, atol=1e-5, msg=name)


def test_existing_run_is_refused_and_untouched(corpus_file: Path, tmp_path: Path):
    data = training_data(corpus_file, "char")
    train(ModelConfig(**SMALL), small_train(max_iters=5), data, tmp_path / "run", progress=False)
    snapshot = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(RunExistsError, match="--resume"):
        train(ModelConfig(**SMALL), small_train(), data, tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="different model config"):
        train(ModelConfig(**{**SMALL, "n_layer": 3}), small_train(), data, tmp_path / "run", resume=True,
              progress=False)
    assert snapshot == {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}


def test_overwrite_deletes_only_a_run_and_only_once_the_new_one_is_set_up(corpus_file: Path, tmp_path: Path,
                                                                          monkeypatch):
    data = training_data(corpus_file, "char")
    run = tmp_path / "run"
    train(ModelConfig(**SMALL), small_train(max_iters=5), data, run, progress=False)
    files = lambda folder: {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}  # noqa: E731
    snapshot = files(run)

    def broken(*args, **kwargs):
        raise ConfigError("the optimizer cannot be built")
    with monkeypatch.context() as m:  # a new run that fails while being set up leaves the old one whole
        m.setattr(sys.modules["transformer_lm.train"], "make_optimizer", broken)
        with pytest.raises(ConfigError, match="optimizer"):
            train(ModelConfig(**SMALL), small_train(), data, run, overwrite=True, progress=False)
    assert files(run) == snapshot

    notes = tmp_path / "notes"  # a folder tlm did not write
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(RunExistsError, match="is not empty and holds no run"):
        train(ModelConfig(**SMALL), small_train(), data, notes, progress=False)
    with pytest.raises(RunExistsError, match="no run tlm wrote"):
        train(ModelConfig(**SMALL), small_train(), data, notes, overwrite=True, progress=False)
    (notes / "config.json").write_text("{}")  # even one that looks like a run is kept if it holds the data
    (notes / "corpus.txt").write_text(corpus_file.read_text())
    with pytest.raises(RunExistsError, match="which this command reads"):
        train(ModelConfig(**SMALL), small_train(), training_data(notes / "corpus.txt", "char"), notes,
              overwrite=True, progress=False)
    with pytest.raises(RunExistsError, match="which this command reads"):  # the prepared folder is read too
        train(ModelConfig(**SMALL), small_train(), data, data.path.parent, overwrite=True, progress=False)
    monkeypatch.chdir(run)
    with pytest.raises(RunExistsError, match="working directory"):
        train(ModelConfig(**SMALL), small_train(), data, Path("."), overwrite=True, progress=False)
    assert files(run) == snapshot and (notes / "notes.txt").read_text() == "mine"
    monkeypatch.chdir(tmp_path)
    train(ModelConfig(**SMALL), small_train(max_iters=2), data, tmp_path / "run", overwrite=True, progress=False)
    assert read_metrics(run / "metrics.jsonl")[-1]["step"] == 2  # the old run's metrics are gone with it


def test_a_checkpoint_pointer_names_only_its_own_step_folder(corpus_file: Path, tmp_path: Path):
    """The `latest` pointer is data, not a path to follow: one naming a folder outside the run (whose checkpoint
    the next save would delete) or a malformed one is a corrupt pointer, and nothing is deleted."""
    data = training_data(corpus_file, "char")
    victim, run = tmp_path / "victim", tmp_path / "run"
    for folder in (victim, run):
        train(ModelConfig(**SMALL), small_train(max_iters=5), data, folder, progress=False)
    pointer = run / "checkpoints" / "latest"
    for bad in ({"step": 5, "dir": "../../victim/checkpoints/step-0000005"}, {"dir": "step-0000005"},
                {"step": "5", "dir": "step-0000005"}, {"step": 4, "dir": "step-0000005"}, [5]):
        pointer.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="pointer .* is corrupt"):
            train(ModelConfig(**SMALL), small_train(max_iters=8), data, run, resume=True, progress=False)
        with pytest.raises(CheckpointError, match="pointer .* is corrupt"):
            load_run(run, "cpu")
    assert (victim / "checkpoints" / "step-0000005" / "model.safetensors").is_file()


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(corpus_file: Path, tmp_path: Path):
    """A loss that becomes NaN or infinite stops the run with a DivergenceError at that step, before any checkpoint
    of the damaged weights: the one on disk stays the last good one, byte for byte (a run went on to its end, saved
    NaN weights over it and reported success)."""
    data = training_data(corpus_file, "char")
    paused = train(ModelConfig(**SMALL), small_train(), data, tmp_path / "run", progress=False, stop_at=4)
    weights = ckpt.latest_checkpoint(paused.run_dir) / "model.safetensors"
    saved = weights.read_bytes()
    with pytest.raises(DivergenceError, match="step 6"):  # step 5 sets weights of ~1e30, step 6's forward overflows
        train(ModelConfig(**SMALL), small_train(lr=1e30, warmup_iters=0, grad_clip=0.0, eval_interval=100), data,
              paused.run_dir, resume=True, progress=False)
    assert ckpt.latest_checkpoint(paused.run_dir).name == "step-0000004" and weights.read_bytes() == saved
    assert all(torch.isfinite(w).all() for w in load_run(paused.run_dir).model.state_dict().values())


def test_a_non_finite_gradient_stops_the_run_before_its_checkpoint(corpus_file: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """A finite loss whose gradient is NaN (an overflow in the backward pass) leaves NaN weights after the step: the
    run stops there too, so step 5's evaluation does not checkpoint them over step 4's."""
    data = training_data(corpus_file, "char")
    paused = train(ModelConfig(**SMALL), small_train(), data, tmp_path / "run", progress=False, stop_at=4)
    saved = (ckpt.latest_checkpoint(paused.run_dir) / "model.safetensors").read_bytes()
    train_module = sys.modules["transformer_lm.train"]  # not the function the package exports by that name
    real = train_module.clip_grad_norm

    def nan_gradient(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        model.tok_emb.weight.grad[0, 0] = float("nan")
        return real(model, max_norm)

    monkeypatch.setattr(train_module, "clip_grad_norm", nan_gradient)
    with pytest.raises(DivergenceError, match="gradient norm became nan at step 5"):
        train(ModelConfig(**SMALL), small_train(), data, paused.run_dir, resume=True, progress=False)
    folder = ckpt.latest_checkpoint(paused.run_dir)
    assert folder.name == "step-0000004" and (folder / "model.safetensors").read_bytes() == saved


def test_the_last_step_is_logged_with_the_floor_lr(corpus_file: Path, tmp_path: Path):
    """metrics.jsonl records the run's last step whatever log_interval is, with the lr the cosine formula gives at
    the end of the budget, lr·min_lr_ratio (steps 1 and multiples of log_interval only ended the record at step 5)."""
    data = training_data(corpus_file, "char")
    res = train(ModelConfig(**SMALL), small_train(max_iters=7, log_interval=5, eval_interval=100), data,
                tmp_path / "run", progress=False)
    records = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 5, 7]
    assert records[-1]["lr"] == pytest.approx(3e-3 * 0.1, rel=1e-12) and records[-1]["tokens"] == 7 * 4 * 16


def test_ctrl_c_saves_checkpoint_and_resume_matches(corpus_file: Path, tmp_path: Path):
    """A real Ctrl-C (SIGINT) to a `tlm train` process: it checkpoints, exits 130, and --resume finishes the run with
    the losses of an uninterrupted run, wherever the signal landed."""
    args = [str(corpus_file), "--tokenizer", "char", "--model.n_layer", "2", "--model.n_head", "2",
            "--model.n_embd", "32", "--model.block_size", "16", "--model.dropout", "0.1", "--train.batch_size", "4",
            "--train.max_iters", "300", "--train.eval_interval", "1000", "--train.eval_batches", "1",
            "--train.log_interval", "1"]
    cmd = [sys.executable, "-m", "transformer_lm.cli", "train", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*cmd, "--out", str(tmp_path / "full")], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "cut")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 300  # generous: a loaded machine can be slow to start torch
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 20:
        assert time.time() < deadline and proc.poll() is None, "the run did not reach step 20"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err.decode()
    assert b"--resume" in err
    stopped = json.loads((tmp_path / "cut" / "checkpoints" / "latest").read_text())["step"]
    assert 0 < stopped < 300
    subprocess.run([*cmd, "--out", str(tmp_path / "cut"), "--resume", "true"], env=env, check=True,
                   capture_output=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def test_metrics_report_mfu_against_the_devices_peak(corpus_file: Path, tmp_path: Path):
    """MFU = training FLOPs per token (6N + attention, from the config) × tokens/s ÷ the device's peak FLOP/s."""
    from transformer_lm.accounting import flops_per_token
    from transformer_lm.perf import peak_flops

    data = training_data(corpus_file, "char")
    res = train(ModelConfig(**SMALL), small_train(max_iters=5, log_interval=1, eval_interval=5), data,
                tmp_path / "run", progress=False)
    records = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if "loss" in r]
    per_token = flops_per_token(ModelConfig(**{**SMALL, "vocab_size": data.tokenizer.vocab_size}))["train"]
    peak = peak_flops(torch.device("cpu"), torch.float32)
    assert len(records) == 5
    for r in records:
        assert r["mfu"] == pytest.approx(per_token * r["tokens_per_s"] / peak, rel=1e-9)
        assert 0 < r["mfu"] < 1
