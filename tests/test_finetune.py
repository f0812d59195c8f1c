"""Fine-tuning (`train.init_from`): a run started from another run's weights, on other text. The reference for its
start is the base model itself: the first step's logged loss is the base model's loss on that step's batch (a
random start's is ~ln(vocab)); the model config and tokenizer are the base run's (an imported model's padded
embedding table and chat template included); what cannot be fine-tuned so is refused in one line, before training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_corpus, random_model
from transformer_lm.api import load_run, read_run_config
from transformer_lm.chat import CHAT_TEMPLATE_FILE, chat_tokens
from transformer_lm.checkpoint import latest_checkpoint, load_state, save_checkpoint
from transformer_lm.cli import main
from transformer_lm.config import ModelConfig, TrainConfig, dump_json
from transformer_lm.errors import CheckpointError, ConfigError
from transformer_lm.tokenizers import BPETokenizer, save_tokenizer
from transformer_lm.train import read_metrics, train
from transformer_lm.train_data import training_data
from transformer_lm.windows import BatchSampler

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)


def _cfg(**kw) -> TrainConfig:
    base = dict(batch_size=4, max_iters=6, eval_interval=6, eval_batches=2, log_interval=1, warmup_iters=2, lr=1e-3)
    return TrainConfig(**{**base, **kw})


def _first_loss(run: Path) -> float:
    return next(r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("step") == 1)


def _loss_on_first_batch(model, data, cfg: TrainConfig, block: int) -> float:
    x, y = BatchSampler(data.train, cfg.batch_size, block, seed=cfg.seed, vocab_size=model.config.vocab_size).next()
    with torch.no_grad():
        return float(model.train()(x, y).loss)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A byte-level run trained a little on Python-looking text."""
    corpus = tmp_path / "base.txt"
    corpus.write_text(make_corpus(seed=0))
    train(ModelConfig(**SMALL), _cfg(max_iters=60, eval_interval=60, lr=3e-3), training_data(corpus, "byte"),
          tmp_path / "base", progress=False)
    return tmp_path / "base"


def test_a_fine_tune_starts_from_the_base_runs_weights(base: Path, tmp_path: Path):
    other = tmp_path / "other.txt"
    other.write_text(make_corpus(seed=5))
    _, model_cfg = read_run_config(base)
    cfg = _cfg(init_from=str(base))
    data = training_data(other, load_run(base, "cpu").tokenizer)
    result = train(model_cfg, cfg, data, tmp_path / "ft", progress=False)
    reference = _loss_on_first_batch(load_run(base, "cpu").model, data, cfg, model_cfg.block_size)
    assert _first_loss(tmp_path / "ft") == pytest.approx(reference, rel=1e-5)
    fresh = train(model_cfg, _cfg(), data, tmp_path / "fresh", progress=False)
    assert _first_loss(tmp_path / "ft") < _first_loss(tmp_path / "fresh") - 1  # a random start: ~ln(256) = 5.5
    assert result.val.loss < fresh.val.loss
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["train"]["init_from"] == str(base) and saved["model"] == model_cfg.to_dict()
    assert load_run(tmp_path / "ft", "cpu").step == 6


def test_the_cli_takes_the_base_runs_model_and_tokenizer_and_resumes(base: Path, tmp_path: Path):
    other = tmp_path / "other.txt"
    other.write_text(make_corpus(seed=5))
    ft = tmp_path / "ft"
    args = ["train", str(other), "--out", str(ft), "--train.init_from", str(base), "--train.batch_size", "4",
            "--train.eval_interval", "2", "--train.eval_batches", "2", "--train.log_interval", "1",
            "--model.dropout", "0.1"]
    assert main([*args, "--train.max_iters", "2"]) == 0
    saved = json.loads((ft / "config.json").read_text())
    _, base_cfg = read_run_config(base)
    assert saved["model"] == {**base_cfg.to_dict(), "dropout": 0.1} and saved["preset"] is None
    assert (ft / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    assert main(["train", "--out", str(ft), "--resume", "true", "--train.max_iters", "4"]) == 0
    assert load_run(ft, "cpu").step == 4


@pytest.mark.parametrize("args, message", [
    (["--model.n_layer", "3"], "fields differ: n_layer 2 -> 3"),
    (["--model.rope_theta", "500.0"], "fields differ: rope_theta"),
    (["--tokenizer", "char"], "--tokenizer char: a fine-tune tokenizes its data with the tokenizer of"),
])
def test_what_a_fine_tune_cannot_change_is_refused(base: Path, tmp_path: Path, capsys, args, message):
    other = tmp_path / "other.txt"
    other.write_text(make_corpus(seed=5))
    assert main(["train", str(other), "--out", str(tmp_path / "ft"), "--train.init_from", str(base), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


def test_a_base_that_is_no_run_or_data_of_another_tokenizer_is_refused(base: Path, tmp_path: Path, capsys):
    other = tmp_path / "other.txt"
    other.write_text(make_corpus(seed=5))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["train", str(other), "--out", str(tmp_path / "ft"), "--train.init_from", str(hf)]) == 2
    assert "import it first: tlm convert" in capsys.readouterr().err
    _, model_cfg = read_run_config(base)
    with pytest.raises(ConfigError, match="tokenized otherwise than train.init_from"):
        train(model_cfg, _cfg(init_from=str(base)), training_data(other, "char"), tmp_path / "ft", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(dump_json({"model": model_cfg.to_dict()}))
    with pytest.raises(CheckpointError, match="has no checkpoint yet"):
        train(model_cfg, _cfg(init_from=str(empty)), training_data(other, "byte"), tmp_path / "ft", progress=False)


def test_an_imported_models_padded_table_and_chat_template_are_kept(tmp_path: Path):
    """An imported model's embedding table may have more rows than its tokenizer has ids (Qwen2's 151,936 for
    151,665): a fine-tune keeps the table as it is, and the chat template with it."""
    tokenizer = BPETokenizer.train(make_corpus(), vocab_size=300)
    config = ModelConfig(**{**SMALL, "pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False},
                         vocab_size=tokenizer.vocab_size + 12, tie_embeddings=False)
    base = tmp_path / "imported"
    base.mkdir()
    (base / "config.json").write_text(dump_json({"model": config.to_dict(), "source": {"format": "huggingface"}}))
    save_tokenizer(tokenizer, base / "tokenizer.json")
    (base / CHAT_TEMPLATE_FILE).write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    save_checkpoint(base, random_model(config), {}, 0)
    other = tmp_path / "other.txt"
    other.write_text(make_corpus(seed=5))
    assert main(["train", str(other), "--out", str(tmp_path / "ft"), "--train.init_from", str(base),
                 "--train.max_iters", "2", "--train.batch_size", "2", "--train.eval_interval", "2",
                 "--train.eval_batches", "1", "--model.block_size", "8"]) == 0
    run = load_run(tmp_path / "ft", "cpu")
    assert run.model.config.vocab_size == tokenizer.vocab_size + 12 and run.model.config.block_size == 8
    assert run.chat_template == (base / CHAT_TEMPLATE_FILE).read_text()
    assert isinstance(run.chat([{"role": "user", "content": "def "}], max_new_tokens=3, seed=0), str)


# --- Supervised fine-tuning on conversations (.jsonl) --------------------------------------------------------------

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# the same format, its replies marked as transformers' return_assistant_tokens_mask reads them
CHATML_MARKED = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
                 "{% generation %}{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
                 "{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def alpha(beta):"},
     {"role": "assistant", "content": "return beta * 2"}, {"role": "user", "content": "naïve ✓"},
     {"role": "assistant", "content": "größe"}],
    [{"role": "user", "content": "x = [1, 2]"}, {"role": "assistant", "content": "alpha"}],
]


def _chat_tokenizer():
    from conftest import chat_rust_tokenizer
    from transformer_lm.tokenizers import HFFileTokenizer

    return HFFileTokenizer(chat_rust_tokenizer(), eot="<|im_end|>")


@pytest.mark.parametrize("chat", range(len(CONVERSATIONS)))
def test_the_replies_are_the_tokens_transformers_marks_as_the_assistants(chat):
    transformers = pytest.importorskip("transformers")
    from transformer_lm.chat import encode_rendered, render_chat

    tok = _chat_tokenizer()
    ids, mask = chat_tokens(CHATML, CONVERSATIONS[chat], tok)
    assert ids == encode_rendered(tok, render_chat(CHATML, CONVERSATIONS[chat], tok, add_generation_prompt=False))
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token="<|im_end|>")
    out = theirs.apply_chat_template(CONVERSATIONS[chat], chat_template=CHATML_MARKED, tokenize=True,
                                     return_dict=True, return_assistant_tokens_mask=True)
    assert list(out["input_ids"]) == ids and list(out["assistant_masks"]) == [int(m) for m in mask]
    replies = "".join(m["content"] + "<|im_end|>\n" for m in CONVERSATIONS[chat] if m["role"] == "assistant")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == replies


def test_a_tokenizer_without_offsets_encodes_the_pieces():
    from transformer_lm.tokenizers import ByteTokenizer

    ids, mask = chat_tokens(CHATML, CONVERSATIONS[0], ByteTokenizer())
    text = bytes(ids).decode()
    assert bytes(i for i, m in zip(ids, mask) if m).decode() == "return beta * 2<|im_end|>\ngröße<|im_end|>\n"
    assert text.endswith("<|im_start|>assistant\ngröße<|im_end|>\n") and len(mask) == len(ids)


def test_a_template_that_rewrites_earlier_turns_cannot_be_split():
    from transformer_lm.errors import ChatError

    forgetful = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(ChatError, match="renders the turns before message 2 otherwise"):
        chat_tokens(forgetful, CONVERSATIONS[0], _chat_tokenizer())


def _chats_file(path: Path, n: int = 24) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"alpha {i}"},
                                             {"role": "assistant", "content": f"beta {i * 2}"}]}) + "\n\n")
    return path


@pytest.fixture
def chat_base(tmp_path: Path) -> Path:
    """A run with a ChatML tokenizer and template, random weights: what `tlm convert` makes of a chat model."""
    tok = _chat_tokenizer()
    config = ModelConfig(**{**SMALL, "block_size": 32}, vocab_size=tok.vocab_size, tie_embeddings=False)
    base = tmp_path / "chat-base"
    base.mkdir()
    (base / "config.json").write_text(dump_json({"model": config.to_dict()}))
    save_tokenizer(tok, base / "tokenizer.json")
    (base / CHAT_TEMPLATE_FILE).write_text(CHATML)
    save_checkpoint(base, random_model(config, std=0.1), {}, 0)
    return base


def test_supervised_fine_tuning_learns_only_the_replies(chat_base: Path, tmp_path: Path):
    """The prepared conversations' targets are the replies alone; the first step's loss is the base model's mean
    cross-entropy over those targets of its batch (F.cross_entropy on its logits); evaluation scores them alone."""
    import torch.nn.functional as F

    chats = _chats_file(tmp_path / "chats.jsonl")
    run = load_run(chat_base, "cpu")
    data = training_data(chats, run.tokenizer, chat_template=run.chat_template)
    assert data.manifest["masked"] and data.manifest["val_conversations"] == 2 and data.chat_template == CHATML
    learned = [int(i) for i, m in zip(data.train, data.train_mask) if m]
    assert run.tokenizer.decode(learned) == "".join(f"beta {i * 2}<|im_end|>\n" for i in range(22))
    cfg = _cfg(init_from=str(chat_base), max_iters=4, eval_interval=4)
    train(run.model.config, cfg, data, tmp_path / "sft", progress=False)
    x, y = BatchSampler(data.train, cfg.batch_size, 32, seed=cfg.seed, mask=data.train_mask,
                        starts=data.train_starts).next()
    with torch.no_grad():
        logits = run.model.train()(x).logits
    reference = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1)
    assert _first_loss(tmp_path / "sft") == pytest.approx(float(reference), rel=1e-5)
    assert (y >= 0).any(dim=1).all()  # every row has a reply token to learn
    ids = torch.tensor(np.asarray(data.train, dtype=np.int64))  # every row begins where a conversation does
    lengths = [len(chat_tokens(CHATML, json.loads(line)["messages"], run.tokenizer)[0])
               for line in chats.read_text().splitlines() if line][:22]
    assert list(data.train_starts) == np.cumsum([0, *lengths[:-1]]).tolist()
    begins = {int(s) for s in data.train_starts if s <= len(ids) - 33} | {len(ids) - 33}  # the last full window
    assert all(any(torch.equal(row, ids[b : b + 32]) for b in begins) for row in x)
    sft = load_run(tmp_path / "sft", "cpu")
    assert sft.chat_template == CHATML
    val = [r for r in read_metrics(tmp_path / "sft" / "metrics.jsonl") if "val_loss" in r][-1]
    ids = torch.tensor(np.asarray(data.val, dtype=np.int64))
    targets = torch.where(torch.from_numpy(np.asarray(data.val_mask, dtype=bool)), ids, -1)
    bounds = [*map(int, data.val_starts), len(ids)]
    losses = []
    with torch.no_grad():  # each conversation on its own, in windows of the context from its first token
        for a, b in zip(bounds, bounds[1:]):
            losses += [F.cross_entropy(sft.model(ids[None, s : min(s + 32, b - 1)]).logits[0],
                                       targets[s + 1 : min(s + 33, b)], ignore_index=-1, reduction="sum")
                       for s in range(a, b - 1, 32)]
    assert val["val_tokens"] == int((targets[1:] >= 0).sum())
    assert val["val_loss"] == pytest.approx(float(sum(losses)) / val["val_tokens"], rel=1e-4)
    held_out = tmp_path / "held_out.jsonl"  # the val split's conversations: scored alike by tlm eval
    held_out.write_text("".join([line + "\n" for line in chats.read_text().split("\n") if line.strip()][-2:]))
    for scored in (sft.evaluate(held_out), sft.evaluate(data.path)):
        assert scored.loss == pytest.approx(val["val_loss"], rel=1e-5) and scored.tokens == val["val_tokens"]


def test_the_masked_sampler_resumes_exactly(chat_base: Path, tmp_path: Path):
    run = load_run(chat_base, "cpu")
    data = training_data(_chats_file(tmp_path / "chats.jsonl"), run.tokenizer, chat_template=CHATML)
    sampler = BatchSampler(data.train, 6, 32, seed=3, mask=data.train_mask, starts=data.train_starts)
    for _ in range(3):
        sampler.next()
    state = sampler.state_dict()
    later = [sampler.next() for _ in range(2)]
    again = BatchSampler(data.train, 6, 32, seed=0, mask=data.train_mask, starts=data.train_starts)
    again.load_state_dict(state)
    for (x, y), (x2, y2) in zip(later, [again.next() for _ in range(2)]):
        assert torch.equal(x, x2) and torch.equal(y, y2)



def test_prepared_conversations_without_their_starts_are_refused(chat_base: Path, tmp_path: Path):
    """A folder prepared before starts.bin was written, or with a damaged one, is refused in one line."""
    from transformer_lm.data import load_prepared
    from transformer_lm.errors import DataError

    run = load_run(chat_base, "cpu")
    folder = training_data(_chats_file(tmp_path / "chats.jsonl"), run.tokenizer, chat_template=CHATML).path
    starts = folder / "train.starts.bin"
    good = starts.read_bytes()
    starts.write_bytes(good[8:] + good[:8])  # the offsets no longer ascend from 0
    with pytest.raises(DataError, match="not ascending from 0"):
        load_prepared(folder)
    starts.write_bytes(good[:-8])
    with pytest.raises(DataError, match="one int64 offset per conversation"):
        load_prepared(folder)
    starts.unlink()
    with pytest.raises(DataError, match="prepare the conversations again"):
        load_prepared(folder)


def test_the_cli_fine_tunes_on_conversations_with_the_runs_or_a_given_template(chat_base: Path, tmp_path: Path,
                                                                             capsys):
    chats = _chats_file(tmp_path / "chats.jsonl")
    common = ["--train.max_iters", "2", "--train.batch_size", "2", "--train.eval_interval", "2",
              "--train.eval_batches", "1"]
    assert main(["train", str(chats), "--out", str(tmp_path / "sft"), "--train.init_from", str(chat_base),
                 *common]) == 0
    assert (tmp_path / "sft" / CHAT_TEMPLATE_FILE).read_text() == CHATML
    assert main(["train", "--out", str(tmp_path / "sft"), "--resume", "true", "--train.max_iters", "3"]) == 0
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    old = tmp_path / "old-prepared"  # the folder an earlier version prepared (no starts): from the source again
    shutil.copytree(config["data"]["prepared"], old)
    (old / "train.starts.bin").unlink()
    (tmp_path / "sft" / "config.json").write_text(json.dumps({**config, "data": {**config["data"],
                                                                                 "prepared": str(old)}}))
    assert main(["train", "--out", str(tmp_path / "sft"), "--resume", "true", "--train.max_iters", "4"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "sft" / "metrics.jsonl") if "loss" in r][-2:] == [3, 4]
    own = tmp_path / "own.jinja"
    own.write_text(CHATML.replace("<|im_start|>", "<|im_start|> "))
    assert main(["train", str(chats), "--out", str(tmp_path / "sft2"), "--train.init_from", str(chat_base),
                 "--chat_template", str(own), *common]) == 0
    assert load_run(tmp_path / "sft2", "cpu").chat_template == own.read_text()
    assert main(["train", str(chats), "--out", str(tmp_path / "byte"), "--chat_template", str(own),
                 "--model.block_size", "64", *common]) == 0  # from scratch, byte-level
    assert load_run(tmp_path / "byte", "cpu").tokenizer.kind == "byte"
    capsys.readouterr()


@pytest.mark.parametrize("lines, args, message", [
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'] * 3, [],
     "chats.jsonl:1: it holds a conversation, which is rendered in a chat template"),
    (['{"messages": [{"role": "user", "content": "a"}]}', "not json"], ["--chat_template", "T"],
     "chats.jsonl:2 is not JSON"),
    (['{"txt": "a"}'], ["--chat_template", "T"], "chats.jsonl:1: it is none of the formats an example may take"),
    (['["a"]'], [], "chats.jsonl:1 is not a JSON object"),
    (['{"conversations": [{"from": "bot", "value": "b"}]}'], [], "chats.jsonl:1: a turn is not {\"from\": one of"),
    (['{"messages": [{"role": "assistant", "content": "b"}]}'] * 2, ["--chat_template", "T"],
     "chats.jsonl:1: the conversation starts with the assistant's turn"),
])
def test_conversations_that_cannot_be_learned_are_refused(tmp_path: Path, capsys, lines, args, message):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(lines) + "\n")
    (tmp_path / "T").write_text(CHATML)
    args = [a if a != "T" else str(tmp_path / "T") for a in args]
    assert main(["train", str(chats), "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_a_chat_template_for_text_is_refused(corpus_file: Path, tmp_path: Path, capsys):
    (tmp_path / "T").write_text(CHATML)
    assert main(["train", str(corpus_file), "--out", str(tmp_path / "run"), "--chat_template",
                 str(tmp_path / "T")]) == 2
    assert "a chat template applies to conversations" in capsys.readouterr().err


# --- LoRA ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_a_lora_layer_is_its_base_plus_the_scaled_low_rank_update(bias):
    from torch import nn

    from transformer_lm.lora import LoRALinear

    torch.manual_seed(0)
    base = nn.Linear(12, 20, bias=bias)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    x = torch.randn(4, 5, 12)
    assert torch.equal(layer(x), base(x))  # B starts at zero: the model itself
    with torch.no_grad():
        layer.lora_b.normal_()
    expected = x @ (base.weight + 2.0 * layer.lora_b @ layer.lora_a).T + (base.bias if bias else 0)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(layer.merged_weight(), base.weight + 2.0 * layer.lora_b @ layer.lora_a)
    assert not base.weight.requires_grad and layer.lora_a.requires_grad and layer.lora_b.requires_grad


@pytest.mark.parametrize("extra", [{}, {"mlp": "swiglu", "n_kv_head": 1, "bias": False}])
def test_add_lora_trains_only_the_adapters_of_every_block_linear(extra):
    from torch import nn

    from transformer_lm.lora import LoRALinear, add_lora, lora_params
    from transformer_lm.model import Transformer

    config = ModelConfig(**SMALL, **extra)
    model = Transformer(config).init_weights(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qkv_out = (config.n_head + 2 * config.kv_heads) * config.head_dim  # r × (in + out) for each qkv and down
    assert add_lora(Transformer(config), rank=4, alpha=8.0, targets=["qkv", "down"]) == lora_params(
        config, 4, ["qkv", "down"]) == config.n_layer * 4 * (config.n_embd + qkv_out + config.ffn_dim + config.n_embd)
    trained = add_lora(model, rank=4, alpha=8.0)
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == config.n_layer * (5 if extra else 4)  # qkv, proj, up, (gate,) down
    assert trained == lora_params(config, 4) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert type(model.lm_head) is nn.Linear
    from transformer_lm.lora import merged_state_dict

    merged = merged_state_dict(model)  # zero updates: exactly the model it wraps
    assert merged.keys() == before.keys() and all(torch.equal(merged[k], before[k]) for k in before)


def _lora(**kw) -> TrainConfig:
    return _cfg(**{"lora_rank": 4, "lora_alpha": 8.0, "lr": 1e-2, **kw})


def test_a_lora_fine_tune_saves_merged_weights_and_leaves_the_base_frozen(base: Path, tmp_path: Path):
    other = tmp_path / "other.txt"
    other.write_text(make_corpus(seed=5))
    _, model_cfg = read_run_config(base)
    data = training_data(other, load_run(base, "cpu").tokenizer)
    cfg = _lora(init_from=str(base))
    train(model_cfg, cfg, data, tmp_path / "lora", progress=False)
    base_model = load_run(base, "cpu").model
    assert _first_loss(tmp_path / "lora") == pytest.approx(_loss_on_first_batch(base_model, data, cfg, 16), rel=1e-5)
    tuned = load_run(tmp_path / "lora", "cpu").model  # a plain model of the merged weights
    state = load_state(latest_checkpoint(tmp_path / "lora"))
    a, b = state["lora"]["blocks.0.attn.qkv.lora_a"], state["lora"]["blocks.0.attn.qkv.lora_b"]
    assert a.shape == (4, 32) and b.abs().sum() > 0  # trained
    delta = tuned.blocks[0].attn.qkv.weight - base_model.blocks[0].attn.qkv.weight
    assert torch.allclose(delta, 2.0 * b @ a, atol=1e-6)  # merged: W + (alpha / r) B A, W as it was
    assert torch.equal(tuned.tok_emb.weight, base_model.tok_emb.weight)  # not adapted
    assert torch.equal(tuned.blocks[1].norm1.weight, base_model.blocks[1].norm1.weight)
    assert len(state["optimizer"]["state"]) == 2 * 4 * model_cfg.n_layer  # moments of the adapters alone


def test_a_lora_fine_tune_resumes_exactly(base: Path, tmp_path: Path):
    other = tmp_path / "other.txt"
    other.write_text(make_corpus(seed=5))
    _, model_cfg = read_run_config(base)
    data = training_data(other, load_run(base, "cpu").tokenizer)
    cfg = _lora(init_from=str(base), max_iters=8, eval_interval=4, lora_dropout=0.1)
    full = train(model_cfg, cfg, data, tmp_path / "full", progress=False)
    half = train(model_cfg, cfg, data, tmp_path / "half", progress=False, stop_at=6)
    assert half.interrupted
    resumed = train(model_cfg, cfg, data, tmp_path / "half", resume=True, progress=False)
    curve = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "half" / "metrics.jsonl") if "loss" in r}
    assert curve == {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r}
    assert resumed.val.loss == full.val.loss
    with pytest.raises(CheckpointError, match="LoRA adapters .* do not fit"):
        train(model_cfg, _lora(init_from=str(base), max_iters=12, lora_rank=2), data, tmp_path / "half",
              resume=True, progress=False)


def test_lora_settings_it_cannot_take_are_refused(base: Path):
    with pytest.raises(ConfigError, match="give the run to fine-tune, --train.init_from"):
        TrainConfig(lora_rank=4)
    with pytest.raises(ConfigError, match="adapters train with adamw"):
        TrainConfig(lora_rank=4, init_from=str(base), optimizer="muon")
    with pytest.raises(ConfigError, match="lora_rank must be >= 0"):
        TrainConfig(lora_rank=-1)


def test_the_memory_plan_counts_gradients_and_moments_of_the_adapters_only():
    from transformer_lm.experiments.memory import plan_memory
    from transformer_lm.lora import lora_params

    config = ModelConfig.from_preset("gpt2")
    whole, lora = plan_memory(config, 1), plan_memory(config, 1, trained=lora_params(config, 8))
    n = lora_params(config, 8)
    assert n == 12 * 8 * ((768 + 2304) + (768 + 768) + 2 * (768 + 3072))  # 1,179,648
    assert lora.optimizer == 8 * n and lora.gradients == 4 * n and lora.weights == whole.weights + 4 * n
    assert lora.peak < whole.peak - 6 * 124_000_000  # the peak (the step's) lost most of 12 bytes a weight


def test_tlm_memory_plans_a_lora_fine_tune(capsys):
    from transformer_lm.experiments.memory import plan_memory
    from transformer_lm.lora import lora_params

    assert main(["memory", "--preset", "gpt2", "--lora_rank", "8", "--json", "true"]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    config = ModelConfig.from_preset("gpt2")
    assert list(plans) == ["DDP+LoRA", "DDP+LoRA+AC"]
    expected = plan_memory(config, 1, world_size=8, trained=lora_params(config, 8), base_bytes=2).to_dict()
    assert plans["DDP+LoRA"] == expected and plans["DDP+LoRA"]["optimizer"] == 8 * lora_params(config, 8)


def test_under_autocast_the_frozen_base_is_held_in_its_precision(base: Path, tmp_path: Path):
    """bf16 autocast (a CPU here, a GPU's default): the adapted layers' frozen weights are bfloat16 (no fp32 copy,
    no autocast copy), the checkpoint's merged weights float32 of that base plus the update; resumed exactly."""
    from transformer_lm.experiments.memory import matmul_weights, plan_memory
    from transformer_lm.lora import LoRALinear, add_lora, hold_base_in, lora_params
    from transformer_lm.model import Transformer

    _, model_cfg = read_run_config(base)
    model = Transformer(model_cfg)
    add_lora(model, 4, 8.0)
    hold_base_in(model, torch.bfloat16)
    held = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert all(m.base.weight.dtype == torch.bfloat16 and m.lora_a.dtype == torch.float32 for m in held)
    assert model.tok_emb.weight.dtype == torch.float32 and model.norm.weight.dtype == torch.float32
    other = tmp_path / "other.txt"
    other.write_text(make_corpus(seed=5))
    data = training_data(other, load_run(base, "cpu").tokenizer)
    cfg = _lora(init_from=str(base), max_iters=8, eval_interval=4, dtype="bfloat16")
    full = train(model_cfg, cfg, data, tmp_path / "full", progress=False)
    train(model_cfg, cfg, data, tmp_path / "half", progress=False, stop_at=6)
    resumed = train(model_cfg, cfg, data, tmp_path / "half", resume=True, progress=False)
    assert resumed.val.loss == full.val.loss
    state = load_state(latest_checkpoint(tmp_path / "full"))
    a, b = state["lora"]["blocks.0.ffn.up.lora_a"], state["lora"]["blocks.0.ffn.up.lora_b"]
    tuned, base_up = load_run(tmp_path / "full", "cpu").model.blocks[0].ffn.up.weight, \
        load_run(base, "cpu").model.blocks[0].ffn.up.weight
    assert torch.allclose(tuned, base_up.bfloat16().float() + 2.0 * b @ a, atol=1e-6)
    loaded = load_run(tmp_path / "full", "cpu")  # a plain float32 model (a bfloat16 bias made its forward fail)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert isinstance(loaded.generate("def ", max_new_tokens=4, seed=0), str)
    config = ModelConfig.from_preset("gpt2")
    whole = plan_memory(config, 1, trained=lora_params(config, 8))
    half = plan_memory(config, 1, trained=lora_params(config, 8), base_bytes=2)
    blocks = matmul_weights(config) - config.vocab_size * config.n_embd
    assert whole.weights - half.weights == 2 * blocks and half.autocast_copies == 2 * config.vocab_size * 768


def test_accumulated_micro_batches_of_conversations_weigh_every_reply_token_alike(chat_base: Path, tmp_path: Path):
    """Micro-batches of conversations hold unequal numbers of targets: a step of 2 × 4 rows must equal one of 8 (the
    same rows: a masked sampler draws them one by one), as when each micro-batch's mean was simply averaged it did
    not (transformers' gradient-accumulation loss bug of 2024)."""
    run = load_run(chat_base, "cpu")
    data = training_data(_chats_file(tmp_path / "chats.jsonl"), run.tokenizer, chat_template=CHATML)
    one = train(run.model.config, _cfg(init_from=str(chat_base), batch_size=8, max_iters=3, eval_interval=3), data,
                tmp_path / "one", progress=False)
    two = train(run.model.config, _cfg(init_from=str(chat_base), batch_size=4, grad_accum=2, max_iters=3,
                                       eval_interval=3), data, tmp_path / "two", progress=False)
    a, b = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("one", "two"))
    assert [r["loss"] for r in a if "loss" in r] == pytest.approx([r["loss"] for r in b if "loss" in r], abs=1e-5)
    assert one.val.loss == pytest.approx(two.val.loss, abs=1e-5)


def test_tlm_prepare_makes_a_fine_tunes_data_with_the_runs_tokenizer(chat_base: Path, tmp_path: Path, capsys):
    """Prepared once (as torchrun's ranks want it), conversations or text, with the tokenizer (and template) of the
    run to fine-tune: `tlm train FOLDER --train.init_from RUN` takes it, and the run keeps the template."""
    chats = _chats_file(tmp_path / "chats.jsonl")
    assert main(["prepare", str(chats), "--out", str(tmp_path / "chat-data"), "--tokenizer_from", str(chat_base)]) == 0
    assert "22 + 2 examples" in capsys.readouterr().out
    run = load_run(chat_base, "cpu")
    direct = training_data(chats, run.tokenizer, chat_template=CHATML)
    from transformer_lm.data import load_prepared

    prepared = load_prepared(tmp_path / "chat-data")
    assert np.array_equal(prepared.train, direct.train) and np.array_equal(prepared.train_mask, direct.train_mask)
    common = ["--train.max_iters", "2", "--train.batch_size", "2", "--train.eval_interval", "2",
              "--train.eval_batches", "1"]
    assert main(["train", str(tmp_path / "chat-data"), "--train.init_from", str(chat_base), "--out",
                 str(tmp_path / "sft"), *common]) == 0
    assert load_run(tmp_path / "sft", "cpu").chat_template == CHATML
    text = tmp_path / "text.txt"
    text.write_text(make_corpus(seed=3))
    assert main(["prepare", str(text), "--out", str(tmp_path / "text-data"), "--tokenizer_from", str(chat_base)]) == 0
    assert main(["train", str(tmp_path / "text-data"), "--train.init_from", str(chat_base), "--out",
                 str(tmp_path / "ft"), *common]) == 0
    assert main(["prepare", str(chats), "--out", str(tmp_path / "x"), "--tokenizer", "char"]) == 2
    assert "--tokenizer char would be trained on them first" in capsys.readouterr().err
    assert main(["prepare", str(chats), "--out", str(tmp_path / "x")]) == 2
    assert "chats.jsonl:1: it holds a conversation, which is rendered in a chat template" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
