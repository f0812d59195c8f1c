"""The LSTM and RNN baselines behind the Transformer's interface: against a naive recurrence written from the gate
equations, incremental decoding against the full forward, causality, the closed-form size and FLOPs, generation
(cached, batched, speculative), and `tlm train/sample/eval --model.arch lstm` end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from transformer_lm.accounting import count_params, flops_per_token, match_params
from transformer_lm.api import load_run
from transformer_lm.cli import main
from transformer_lm.config import ModelConfig, TrainConfig
from transformer_lm.errors import ConfigError, ConversionError
from transformer_lm.generate import generate, generate_batch, sample_next
from transformer_lm.interop.hf import export_hf
from transformer_lm.model import Transformer, build_model
from transformer_lm.quantize import quantize
from transformer_lm.recurrent import RecurrentLM
from transformer_lm.speculative import speculative_generate
from transformer_lm.train import train
from transformer_lm.train_data import training_data

VARIANTS = [("lstm", True), ("lstm", False), ("rnn", True), ("rnn", False)]


def make(arch: str, bias: bool = True, **overrides) -> RecurrentLM:
    config = ModelConfig(**{**dict(arch=arch, vocab_size=37, block_size=24, n_layer=2, n_embd=16, bias=bias),
                            **overrides})
    model = build_model(config).init_weights(0)
    assert isinstance(model, RecurrentLM)
    with torch.no_grad():  # non-zero biases everywhere, so that a misplaced bias would show
        for name, p in model.rnn.named_parameters():
            if name.startswith("bias"):
                p.uniform_(-0.5, 0.5)
    return model.eval()


def naive_logits(model: RecurrentLM, idx: torch.Tensor) -> torch.Tensor:
    """The recurrence from its equations, one position and one layer at a time, with the module's own weights:
    LSTM  i, f, g, o = σ, σ, tanh, σ of (x W_ihᵀ + b_ih + h W_hhᵀ + b_hh);  c = f·c + i·g;  h = o·tanh(c)
    RNN   h = tanh(x W_ihᵀ + b_ih + h W_hhᵀ + b_hh);  then logits = h_top · headᵀ."""
    cfg, rnn = model.config, model.rnn
    x = model.tok_emb(idx)  # (B, T, C)
    B, T, C = x.shape
    h = [x.new_zeros(B, C) for _ in range(cfg.n_layer)]
    c = [x.new_zeros(B, C) for _ in range(cfg.n_layer)]
    top = []
    for t in range(T):
        inp = x[:, t]
        for layer in range(cfg.n_layer):
            pre = inp @ getattr(rnn, f"weight_ih_l{layer}").T + h[layer] @ getattr(rnn, f"weight_hh_l{layer}").T
            if cfg.bias:
                pre = pre + getattr(rnn, f"bias_ih_l{layer}") + getattr(rnn, f"bias_hh_l{layer}")
            if cfg.arch == "lstm":
                i, f, g, o = pre.chunk(4, dim=-1)
                c[layer] = torch.sigmoid(f) * c[layer] + torch.sigmoid(i) * torch.tanh(g)
                h[layer] = torch.sigmoid(o) * torch.tanh(c[layer])
            else:
                h[layer] = torch.tanh(pre)
            inp = h[layer]
        top.append(inp)
    return torch.stack(top, dim=1) @ model.lm_head.weight.T


@pytest.mark.parametrize("arch,bias", VARIANTS)
def test_forward_and_cached_steps_match_the_naive_recurrence(arch, bias):
    model = make(arch, bias)
    idx = torch.randint(0, 37, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = naive_logits(model, idx)
        torch.testing.assert_close(model(idx).logits, expected, atol=1e-5, rtol=1e-5)  # fused nn.LSTM / nn.RNN
        cache = model.make_cache(3)
        pieces = [model(idx[:, a:b], cache=cache).logits for a, b in ((0, 4), (4, 5), (5, 11))]
        torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-5, rtol=1e-5)
        assert cache.pos == 11


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_cache_rewinds_exactly_and_the_model_is_causal(arch):
    model = make(arch)
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 37, (2, 12), generator=gen)
    other = idx.clone()
    other[:, 7:] = torch.randint(0, 37, (2, 5), generator=gen)
    with torch.no_grad():
        full, full_other = model(idx).logits, model(other).logits
        torch.testing.assert_close(full_other[:, :7], full[:, :7], atol=0, rtol=0)  # the future changes nothing
        assert not torch.allclose(full_other[:, 7:], full[:, 7:])
        cache = model.make_cache(2)
        model(idx, cache=cache)
        cache.pos = 7  # rewind past the last 5 positions, as speculative decoding does on a rejection
        torch.testing.assert_close(model(other[:, 7:], cache=cache).logits, full_other[:, 7:], atol=1e-5, rtol=1e-5)
        cache.pos = 0  # and back to the start: the zero state
        torch.testing.assert_close(model(idx[:, :3], cache=cache).logits, full[:, :3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_generation_past_the_training_window_carries_the_state(arch, caplog):
    """A recurrent model has no context window, but generation treated block_size as one: a longer prompt was cut
    to its last block_size - 1 ids (with a warning), and a full cache threw the state away for a restart from the
    last half window, each block_size / 2 tokens (a trained 2x64 LSTM reads held-out text at 0.640 nats/char with
    its state carried, 0.674 in 32-character windows). Now the state carries everything read: sampled ids equal a
    seeded draw from the naive recurrence over the whole text, with the cache (a ring of the last states) and
    without it, alone and batched."""
    torch.manual_seed(0)  # make()'s biases
    model = make(arch)  # block_size 24
    with torch.no_grad():  # a long memory, so that what the window left out shows in the draws
        d = model.config.n_embd
        for layer in range(model.config.n_layer):
            if arch == "lstm":
                getattr(model.rnn, f"bias_ih_l{layer}")[d:2 * d] = 4.0  # forget gates ~0.98
            else:  # orthogonal: the state neither fades nor explodes
                getattr(model.rnn, f"weight_hh_l{layer}").copy_(torch.linalg.qr(torch.randn(d, d))[0])
    prompt = list(range(1, 31))

    def draws() -> torch.Generator:
        return torch.Generator().manual_seed(5)

    ids, gen = list(prompt), draws()
    with torch.no_grad():
        for _ in range(40):
            ids.append(int(sample_next(naive_logits(model, torch.tensor([ids]))[:, -1], 1.0, generator=gen)))
    expected = ids[len(prompt):]
    assert len(set(expected)) > 5  # not a degenerate repetition
    with caplog.at_level(logging.WARNING):
        for use_cache in (True, False):
            assert list(generate(model, prompt, 40, temperature=1.0, generator=draws(), use_cache=use_cache)) == \
                expected
        assert generate_batch(model, [prompt], 40, temperature=1.0, generator=draws()) == [expected]
        prompts = [prompt, prompt[-3:]]  # left padding, 69 positions through a ring of 24 states
        assert generate_batch(model, prompts, 40) == [list(generate(model, q, 40, temperature=0.0)) for q in prompts]
    assert "context window" not in caplog.text
    idx = torch.randint(0, 37, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a ring of 4 states: 11 positions in pieces, then a rewind of 2 (less than 4)
        full = naive_logits(model, idx)
        cache = model.make_cache(3, max_len=4)
        pieces = [model(idx[:, a:b], cache=cache).logits for a, b in ((0, 4), (4, 5), (5, 11))]
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
        cache.pos = 9
        torch.testing.assert_close(model(idx[:, 9:], cache=cache).logits, full[:, 9:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,bias", VARIANTS)
@pytest.mark.parametrize("tie", [True, False])
def test_closed_form_size_and_flops(arch, bias, tie):
    model = make(arch, bias, tie_embeddings=tie)
    p = count_params(model.config)
    assert p.total == model.num_params() and p.non_embedding == model.num_params(exclude_embeddings=True)
    assert p.embedding == model.tok_emb.weight.numel()
    # FLOPs per token: what FlopCounterMode measures on the naive recurrence (2 per multiply-add of every matmul)
    idx = torch.randint(0, 37, (2, 5))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        naive_logits(model, idx)
    assert flops_per_token(model.config)["forward"] == counter.get_total_flops() / idx.numel()
    assert flops_per_token(model.config)["attention_forward"] == 0


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_match_params_picks_the_closest_width(arch):
    base = ModelConfig.from_preset("tiny")
    matched = match_params(base, arch)
    assert matched.arch == arch and matched.n_layer == base.n_layer and matched.vocab_size == base.vocab_size
    target = count_params(base).non_embedding

    def gap(width: int) -> int:
        return abs(count_params(ModelConfig.from_dict({**matched.to_dict(), "n_embd": width})).non_embedding - target)

    assert gap(matched.n_embd) <= min(gap(matched.n_embd - 1), gap(matched.n_embd + 1))
    assert gap(matched.n_embd) / target < 0.01
    with pytest.raises(ConfigError):
        match_params(base, "transformer")  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_generation_cached_batched_and_speculative(arch):
    model = make(arch)
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8, 9]]
    alone = [list(generate(model, p, 8, temperature=0.0)) for p in prompts]
    for p, ids in zip(prompts, alone):
        assert list(generate(model, p, 8, temperature=0.0, use_cache=False)) == ids  # the cache is only a speed-up
    assert generate_batch(model, prompts, 8) == alone  # left padding leaves each row's state untouched
    # speculative decoding rewinds the state: the recurrent model as the draft and as the target
    transformer = Transformer(ModelConfig(vocab_size=37, block_size=24, n_layer=1, n_head=2, n_embd=16)).init_weights(3)
    transformer.eval()
    for target, draft in ((transformer, model), (model, transformer)):
        expected = list(generate(target, prompts[0], 10, temperature=0.0))
        assert list(speculative_generate(target, draft, prompts[0], 10, k=3, temperature=0.0)) == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lstm_runs_under_cpu_autocast(dtype):
    """torch's oneDNN LSTM fails under a CPU autocast ("could not create a primitive descriptor": `--train.dtype
    bfloat16` crashed at the first step); the recurrence runs in float32, the LM head in the autocast dtype."""
    model = make("lstm")
    idx = torch.randint(0, 37, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = naive_logits(model, idx)
        with torch.autocast("cpu", dtype=dtype):
            fused, stepped = model(idx).logits, model(idx, cache=model.make_cache(3)).logits
    for logits in (fused, stepped):
        assert logits.dtype == dtype  # the head did run in the autocast dtype
        torch.testing.assert_close(logits.float(), expected, atol=3e-2, rtol=3e-2)
    model.train()
    with torch.autocast("cpu", dtype=dtype):
        loss = model(idx[:, :-1], idx[:, 1:]).loss  # a training step's forward and backward, as train() runs them
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_cpu_lstm_under_autocast_is_measured_against_the_float32_peak(tmp_path: Path, corpus_file: Path,
                                                                        monkeypatch):
    """Its recurrence runs in float32 under a CPU autocast (test_lstm_runs_under_cpu_autocast), but its MFU divided
    by the bf16 peak: 475 % on this CPU, whose bf16 products are ~10x slower than its fp32 ones."""
    import importlib

    asked = []  # the package's `train` is the function: the module by its full name
    monkeypatch.setattr(importlib.import_module("transformer_lm.train"), "peak_flops",
                        lambda device, dtype: asked.append(dtype) or 1e12)
    data = training_data(corpus_file, "char")
    for arch in ("lstm", "rnn"):
        train(ModelConfig(arch=arch, n_layer=1, n_embd=16, block_size=16),
              TrainConfig(max_iters=1, eval_batches=1, batch_size=2, warmup_iters=0, device="cpu", dtype="bfloat16"),
              data, tmp_path / arch, progress=False)
    assert asked == [torch.float32, torch.bfloat16]  # the RNN runs in bf16 under autocast (on its list)


def test_activation_checkpointing_of_a_recurrent_model_is_refused_before_the_data(tmp_path: Path,
                                                                                   corpus_file: Path, capsys,
                                                                                   monkeypatch):
    """It was refused by parallelize, once the corpus had been tokenized (minutes for a large one)."""
    import importlib

    def prepare(*args, **kwargs):
        raise AssertionError("the data was prepared first")

    monkeypatch.setattr(importlib.import_module("transformer_lm.train_data"), "training_data", prepare)
    code, out, err = tlm(capsys, "train", corpus_file, "--out", tmp_path / "run", "--tokenizer", "char",
                         "--model.arch", "rnn", "--train.activation_checkpointing", "true")
    assert code == 2 and err.count("\n") == 1, err
    assert "train.activation_checkpointing recomputes Transformer blocks; an rnn model has none" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="an lstm model has none"):  # the API's train() too
        train(ModelConfig(arch="lstm"), TrainConfig(activation_checkpointing=True), None, tmp_path / "api")


def test_a_recurrent_model_decodes_eagerly_when_asked_to_compile(monkeypatch, caplog):
    """`tlm sample --compile true` decoded an LSTM eagerly after a warning, but Run.generate(compile=True),
    generate() and generate_batch() compiled its step, whose cache position is a Python int: recompiled at every
    position (30 tokens of a small LSTM took 76 s). Every entry point now decodes it eagerly, warning once a call."""
    from transformer_lm import decode
    from transformer_lm.api import Run
    from transformer_lm.tokenizers import ByteTokenizer

    monkeypatch.setattr(decode, "compiled_decode_step", lambda *a: pytest.fail("a recurrent decode step compiled"))
    model = make("lstm", vocab_size=256)
    run = Run(Path("run"), {}, model, ByteTokenizer(), 0)
    with caplog.at_level(logging.WARNING):
        assert list(generate(model, [1, 2, 3], 8, temperature=0.0, compile=True)) == \
            list(generate(model, [1, 2, 3], 8, temperature=0.0))
        assert generate_batch(model, [[1, 2], [3]], 5, compile=True) == generate_batch(model, [[1, 2], [3]], 5)
        assert run.generate("ab", max_new_tokens=6, seed=0, num_samples=2, compile=True) == \
            run.generate("ab", max_new_tokens=6, seed=0, num_samples=2)
    assert caplog.text.count("this lstm samples eagerly") == 3


def test_attention_only_features_raise_typed_errors(tmp_path: Path):
    model = make("lstm")
    with pytest.raises(ConfigError, match="no attention weights"):
        model(torch.zeros(1, 3, dtype=torch.long), return_attentions=True)
    with pytest.raises(ConfigError, match="lstm model has none"):
        quantize(model, 8)
    with pytest.raises(ConfigError, match="model.arch"):
        RecurrentLM(ModelConfig())
    assert isinstance(build_model(ModelConfig(n_layer=1)), Transformer)


def test_transformer_only_settings_of_a_recurrent_model_are_reported(tmp_path: Path, corpus_file: Path, capsys,
                                                                     caplog):
    """`tlm train --model.arch lstm --model.n_head 8 --model.pos_encoding rope` trained the same LSTM as without the
    two flags, and `tlm info` counted it, without a word; both now name what is ignored (and only that)."""
    lstm = ModelConfig(arch="lstm", n_layer=1, n_embd=16, block_size=16, n_head=8, pos_encoding="rope", bias=False)
    assert lstm.unused_fields() == {"n_head": 8, "pos_encoding": "rope"}  # bias applies to the LSTM's gates
    assert ModelConfig(arch="rnn").unused_fields() == {} == ModelConfig(n_head=8).unused_fields()
    assert build_model(lstm).num_params() == build_model(ModelConfig(arch="lstm", n_layer=1, n_embd=16,
                                                                     block_size=16, bias=False)).num_params()
    with caplog.at_level(logging.WARNING):
        train(lstm, TrainConfig(max_iters=1, eval_batches=1, batch_size=2, warmup_iters=0),
              training_data(corpus_file, "char"), tmp_path / "run", progress=False)
        assert tlm(capsys, "info", "--model.arch", "rnn", "--model.sliding_window", "4")[0] == 0
        assert tlm(capsys, "info", "--model.arch", "rnn")[0] == 0
    warned = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert len(warned) == 2, warned
    assert "model.arch=lstm does not use model.n_head=8, model.pos_encoding=rope " in warned[0]
    assert "model.arch=rnn does not use model.sliding_window=4 " in warned[1]


def test_resuming_a_run_saved_before_the_arch_field(tmp_path: Path, corpus_file: Path):
    """config.json files written before `arch` existed lack it; resuming reads the default (transformer)."""
    data = training_data(corpus_file, "char")
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
    train_cfg = TrainConfig(max_iters=4, eval_interval=2, eval_batches=1, batch_size=2, warmup_iters=1)
    run = tmp_path / "run"
    assert train(cfg, train_cfg, data, run, progress=False, stop_at=2).interrupted
    saved = json.loads((run / "config.json").read_text())
    del saved["model"]["arch"]
    (run / "config.json").write_text(json.dumps(saved))
    assert train(cfg, train_cfg, data, run, resume=True, progress=False).step == 4


def tlm(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_train_sample_eval_lstm_end_to_end(tmp_path: Path, corpus_file: Path, capsys, caplog):
    run = tmp_path / "run"
    code, out, err = tlm(capsys, "train", corpus_file, "--out", run, "--tokenizer", "char", "--model.arch", "lstm",
                         "--model.n_layer", "1", "--model.n_embd", "32", "--model.block_size", "32",
                         "--train.batch_size", "4", "--train.max_iters", "6", "--train.eval_interval", "3",
                         "--train.eval_batches", "2")
    assert code == 0, err
    assert "6 steps" in out
    config = json.loads((run / "config.json").read_text())["model"]
    assert config["arch"] == "lstm"
    assert sorted(json.loads((run / "checkpoints" / "latest").read_text())) == ["dir", "step"]

    code, out, err = tlm(capsys, "sample", run, "def ", "--max_new_tokens", "20", "--seed", "0")
    assert code == 0, err
    assert out.startswith("def ") and len(out) > len("def \n")
    assert tlm(capsys, "sample", run, "def ", "--max_new_tokens", "20", "--seed", "0")[1] == out  # seeded
    with caplog.at_level(logging.WARNING):  # compiling its step would recompile at every position: eager, said once
        compiled = tlm(capsys, "sample", run, "def ", "--max_new_tokens", "20", "--seed", "0", "--compile", "true")
    assert compiled[1] == out
    assert caplog.text.count("this lstm samples eagerly") == 1
    caplog.clear()
    from transformer_lm import generate as gen  # the API too: it recompiled at every token (30 tokens: 35 s)
    from transformer_lm.decode import decode_one_token

    steps = []
    with caplog.at_level(logging.WARNING), pytest.MonkeyPatch.context() as m:
        m.setattr(gen, "decode_step", lambda compile, device: steps.append(compile) or decode_one_token)
        assert load_run(run).generate("def ", max_new_tokens=20, seed=0, compile=True) == out[len("def "):-1]
    assert steps == [False] and "this lstm samples eagerly" in caplog.text

    code, out, err = tlm(capsys, "eval", run, "--data", corpus_file, "--json", "true")
    assert code == 0, err
    res = json.loads(out)
    assert 0 < res["loss"] < 5 and res["tokens"] > 0

    code, out, err = tlm(capsys, "info", run)
    assert code == 0 and f"{count_params(ModelConfig.from_dict(config)).total:,}" in out
    # its FLOPs do not depend on the context (it read "(context 32)", the block size)
    forward = flops_per_token(ModelConfig.from_dict(config))["forward"]
    assert f"{forward:,.0f}   (no attention: any context)" in out

    for argv, match in ((["attention", run, "def a", "--out", tmp_path / "attn"], "no attention weights"),
                        (["export", run, "--out", tmp_path / "hf"], "cannot export an lstm model"),
                        (["sample", run, "def", "--quantize", "int8"], "lstm model has none")):
        code, out, err = tlm(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and match in err, err
    with pytest.raises(ConversionError):
        export_hf(run, tmp_path / "hf2")
