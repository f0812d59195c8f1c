"""Fine-tuning examples in the formats datasets ship (chat_data.py): ShareGPT's conversations as the same messages,
prompt-completion pairs encoded as TRL tokenizes them (the prompt with its BOS, the completion apart, an end of
sequence after it: only the completion learned), conversational pairs learning the completion's replies only,
documents learned whole; a base model without a chat template fine-tuned on pairs, and evaluated on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import chat_rust_tokenizer, random_model
from transformer_lm.api import load_run
from transformer_lm.chat import chat_tokens
from transformer_lm.chat_data import encode_chats, encode_example
from transformer_lm.checkpoint import save_checkpoint
from transformer_lm.cli import main
from transformer_lm.config import ModelConfig, dump_json
from transformer_lm.tokenizers import ByteTokenizer, HFFileTokenizer, save_tokenizer
from transformer_lm.train_data import training_data
from transformer_lm.windows import BatchSampler

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def alpha(beta):"},
            {"role": "assistant", "content": "return beta * 2"}, {"role": "user", "content": "naïve ✓"},
            {"role": "assistant", "content": "größe"}]


@pytest.fixture(scope="module")
def tokenizer() -> HFFileTokenizer:
    """ChatML's specials, and a BOS its post-processor puts first (as Llama's tokenizers do)."""
    from tokenizers.processors import TemplateProcessing

    rust = chat_rust_tokenizer()
    rust.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
        ("<|begin_of_text|>", rust.token_to_id("<|begin_of_text|>"))])
    return HFFileTokenizer(rust, eot="<|im_end|>", bos="<|begin_of_text|>")


def test_sharegpt_conversations_are_the_same_messages(tokenizer):
    sharegpt = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                   "value": m["content"]} for m in MESSAGES]}
    assert encode_example(sharegpt, CHATML, tokenizer) == chat_tokens(CHATML, MESSAGES, tokenizer)


def test_a_pair_is_tokenized_as_trl_tokenizes_it(tokenizer):
    """prompt_ids = tokenizer(prompt) (its BOS first), completion_ids = tokenizer(completion, no special tokens),
    then the end of sequence; the completion and its end are learned."""
    rust = tokenizer.hf
    prompt, completion = "def alpha(beta):\n", "    return beta * 2\n"
    ids, mask = encode_example({"prompt": prompt, "completion": completion}, None, tokenizer)
    head = rust.encode(prompt).ids
    tail = rust.encode(completion, add_special_tokens=False).ids + [rust.token_to_id("<|im_end|>")]
    assert head[0] == rust.token_to_id("<|begin_of_text|>")
    assert ids == head + tail and mask == [False] * len(head) + [True] * len(tail)
    text_ids, text_mask = encode_example({"text": completion}, None, tokenizer)
    assert text_ids == rust.encode(completion).ids + tail[-1:] and text_mask == [False] + [True] * (len(text_ids) - 1)


def test_a_conversational_pair_learns_its_completions_replies_only(tokenizer):
    """A few-shot prompt's own assistant turn is context; the completion's reply is learned."""
    ids, mask = encode_example({"prompt": MESSAGES[:4], "completion": MESSAGES[4:]}, CHATML, tokenizer)
    whole, whole_mask = chat_tokens(CHATML, MESSAGES, tokenizer)
    assert ids == whole
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "größe<|im_end|>\n"
    assert sum(mask) < sum(whole_mask) and all(w for m, w in zip(mask, whole_mask) if m)


def test_a_base_model_without_a_template_fine_tunes_on_pairs(tmp_path: Path, caplog):
    """Pairs and documents need no chat template: `tlm train pairs.jsonl --train.init_from BASE` learns the
    completions (its first loss is the base's cross-entropy on their targets alone), the run has no template, and
    `tlm eval` scores the completions as the run's evaluation does. Byte tokenizer: no end mark, said once."""
    tok = ByteTokenizer()
    config = ModelConfig(vocab_size=256, block_size=48, n_layer=1, n_head=2, n_embd=32, tie_embeddings=False)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(dump_json({"model": config.to_dict()}))
    save_tokenizer(tok, base / "tokenizer.json")
    save_checkpoint(base, random_model(config, std=0.1), {}, 0)
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Q: {i} + {i}?\nA:", "completion": f" {2 * i}\n"} for i in range(30)] + \
        [{"text": "Q: and so on.\n"}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ft"
    assert main(["train", str(pairs), "--train.init_from", str(base), "--out", str(out), "--train.max_iters", "2",
                 "--train.batch_size", "4", "--train.eval_interval", "2", "--train.eval_batches", "4",
                 "--train.warmup_iters", "1"]) == 0
    assert "no end-of-text token" in caplog.text and "training examples are longer" not in caplog.text
    data = training_data(pairs, tok, chat_template=None)  # what the run trained on (the cache's)
    sampler = BatchSampler(data.train, 4, 48, seed=1337, mask=data.train_mask, starts=data.train_starts)
    x, y = sampler.next()
    segments, base_model = sampler.layout["segments"], load_run(base, "cpu").model.train()
    total, count = 0.0, 0
    with torch.no_grad():  # the first step's loss: every packed example computed alone, from position 0
        for row in range(len(x)):
            for seg in segments[row].unique():
                at = (segments[row] == seg).nonzero().flatten()
                piece = base_model(x[row : row + 1, at[0] : at[-1] + 1]).logits[0]
                total += float(F.cross_entropy(piece, y[row, at[0] : at[-1] + 1], ignore_index=-1, reduction="sum"))
                count += int((y[row, at[0] : at[-1] + 1] >= 0).sum())
    first = next(json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line).get("step") == 1)
    assert first == pytest.approx(total / count, rel=1e-5) and len(segments[0].unique()) > 1
    run = load_run(out, "cpu")
    assert run.chat_template is None
    encoded, _ = encode_chats([pairs], None, tok)
    assert [bytes(i for i, m in zip(*e) if m).decode() for e in encoded[:2]] == [" 0\n", " 2\n"]
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line][-1]
    scored = run.evaluate(pairs)  # every example, each on its own: a reference computed here
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in encoded:
            x, y = torch.tensor(ids[:-1])[None], torch.tensor(ids[1:])
            y = torch.where(torch.tensor(mask[1:]).bool(), y, -1)
            total += float(F.cross_entropy(run.model(x).logits[0], y, ignore_index=-1, reduction="sum"))
            count += int((y >= 0).sum())
    assert scored.tokens == count and scored.loss == pytest.approx(total / count, rel=1e-5)
    long = tmp_path / "long.jsonl"  # an example longer than the window: said, with how to keep it whole
    long.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "x" * 80}, *rows[:20]]))
    assert main(["train", str(long), "--train.init_from", str(base), "--out", str(tmp_path / "long"),
                 "--train.max_iters", "1", "--train.eval_interval", "1", "--train.eval_batches", "1"]) == 0
    assert "1 of 19 training examples are longer than the 48-token window (the longest: 80 tokens)" in caplog.text
    held_out = sum(sum(m[1:]) for _, m in encoded[-3:])  # the val split: the last 10 % of the examples
    assert val["val_tokens"] == held_out and np.isfinite(val["val_loss"])


def test_neftune_noise_is_uniform_of_its_bound_in_training_only_and_resumes_exactly(tmp_path: Path):
    """train.neftune_alpha: the token embedding's output moves by at most alpha / sqrt(T · C) (and nearly that
    much), only in training mode; a run with it resumes exactly (the noise comes from the checkpointed generator)."""
    from transformer_lm.config import TrainConfig
    from transformer_lm.model import Transformer
    from transformer_lm.train import _noisy_embeddings, train

    config = ModelConfig(vocab_size=256, block_size=48, n_layer=1, n_head=2, n_embd=32)
    model = Transformer(config).init_weights(0)
    ids = torch.randint(256, (3, 40))
    clean = model.tok_emb(ids).detach()
    _noisy_embeddings(model, 5.0)
    bound = 5.0 / (40 * 32) ** 0.5
    noise = model.train().tok_emb(ids).detach() - clean
    assert float(noise.abs().max()) <= bound + 1e-6 and float(noise.abs().max()) > 0.95 * bound
    assert float(noise.abs().mean()) == pytest.approx(bound / 2, rel=0.05)  # uniform on [-bound, bound]
    assert torch.equal(model.eval().tok_emb(ids), clean)
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(40)))
    data = training_data(text, ByteTokenizer(), chat_template=None)
    cfg = TrainConfig(batch_size=4, max_iters=6, eval_interval=3, eval_batches=2, warmup_iters=1, lr=3e-3,
                      neftune_alpha=5.0)
    full = train(config, cfg, data, tmp_path / "full", progress=False)
    train(config, cfg, data, tmp_path / "half", progress=False, stop_at=3)
    assert train(config, cfg, data, tmp_path / "half", resume=True, progress=False).val.loss == full.val.loss
    plain = train(config, TrainConfig(**{**cfg.__dict__, "neftune_alpha": 0.0}), data, tmp_path / "plain",
                  progress=False)
    assert plain.val.loss != full.val.loss


def test_a_datasets_shards_are_its_examples_one_after_another(tmp_path: Path, capsys):
    """A folder, glob or list of .jsonl files is one set of examples, in order: the same prepared arrays as the
    files joined into one; a folder that also holds text is text."""
    from transformer_lm.chat_data import example_files
    from transformer_lm.data import load_prepared

    rows = [json.dumps({"prompt": f"{i} + {i} =", "completion": f" {2 * i}"}) + "\n" for i in range(30)]
    whole = tmp_path / "whole.jsonl"
    whole.write_text("".join(rows))
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):
        (shards / f"train-{k:05d}-of-00003.jsonl").write_text("".join(rows[10 * k : 10 * k + 10]))
    reference = training_data(whole, ByteTokenizer())
    for given in (shards, str(shards / "*.jsonl"), sorted(shards.iterdir())):
        data = training_data(given, ByteTokenizer())
        for split in ("train", "val", "train_mask", "val_mask", "train_starts", "val_starts"):
            assert np.array_equal(getattr(data, split), getattr(reference, split)), (given, split)
    assert main(["prepare", *map(str, sorted(shards.iterdir())), "--out", str(tmp_path / "prepared")]) == 0
    assert "27 + 3 examples" in capsys.readouterr().out
    assert np.array_equal(load_prepared(tmp_path / "prepared").train_starts, reference.train_starts)
    (shards / "README.txt").write_text("a dataset card\n")
    assert example_files(shards) is None and example_files(tmp_path / "nothing.jsonl") is None


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)  # several batches to read
    return path


def _without_nulls(value: object) -> object:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return [_without_nulls(v) for v in value] if isinstance(value, list) else value


def test_parquet_examples_are_the_json_lines_ones(tmp_path: Path, tokenizer):
    """Each format, as a Parquet file (as the Hugging Face Hub serves datasets: messages a list of structs, null where
    a row lacks a column or a message a field) and as JSON Lines without the nulls: the same encoded examples."""
    conversation = [{**m, "name": None} for m in MESSAGES]  # a struct field of every message, null in these
    tables = {
        "messages": [{"messages": conversation, "source": None}, {"messages": MESSAGES[1:3], "source": "web"}],
        "completions": [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}", "source": None if i % 2 else "x"}
                        for i in range(8)],
        "documents": [{"text": "def alpha(beta):\n    return beta\n"}, {"text": "naïve größe ✓"}],
        "pairs": [{"prompt": [MESSAGES[1]], "chosen": [MESSAGES[2]], "rejected": [MESSAGES[4]]}] * 4,
    }
    for name, rows in tables.items():
        parquet = _write_parquet(tmp_path / f"{name}.parquet", rows)
        lines = tmp_path / f"{name}.jsonl"
        lines.write_text("".join(json.dumps(_without_nulls(row)) + "\n" for row in rows))
        assert encode_chats([parquet], CHATML, tokenizer) == encode_chats([lines], CHATML, tokenizer), name
        assert encode_chats([parquet], CHATML, tokenizer)[1] == (name == "pairs")


def test_a_hub_datasets_parquet_shards_train_and_bad_files_are_named(tmp_path: Path, monkeypatch):
    """A folder of Parquet shards (data/train-0000k-of-0000n.parquet) is its examples in order, as the same rows in
    one JSON Lines file; a file that is not Parquet, and a missing pyarrow, are one-line DataErrors naming the file."""
    from transformer_lm.chat_data import example_files
    from transformer_lm.errors import DataError

    rows = [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(30)]
    whole = tmp_path / "whole.jsonl"
    whole.write_text("".join(json.dumps(row) + "\n" for row in rows))
    shards = tmp_path / "dataset" / "data"
    shards.mkdir(parents=True)
    for k in range(3):
        _write_parquet(shards / f"train-{k:05d}-of-00003.parquet", rows[10 * k: 10 * k + 10])
    reference = training_data(whole, ByteTokenizer())
    for given in (shards.parent, str(shards / "train-*.parquet"), shards / "train-00000-of-00003.parquet"):
        data = training_data(given, ByteTokenizer())
        n = len(data.train_starts) + len(data.val_starts)
        assert n == (10 if isinstance(given, Path) and given.suffix else 30)
        if n == 30:
            for split in ("train", "val", "train_mask", "val_mask", "train_starts", "val_starts"):
                assert np.array_equal(getattr(data, split), getattr(reference, split)), (given, split)
    assert example_files(shards) == sorted(shards.iterdir())
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes((shards / "train-00000-of-00003.parquet").read_bytes()[:-100])
    with pytest.raises(DataError, match=r"cannot read the examples in .*damaged\.parquet .*give a Parquet file"):
        training_data(damaged, ByteTokenizer())
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(DataError, match=r"train-00001-of-00003\.parquet is a Parquet file, .*pip install pyarrow"):
        encode_chats([shards / "train-00001-of-00003.parquet"], None, ByteTokenizer())
