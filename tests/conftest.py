"""Shared fixtures: a small corpus the tests write themselves, a private cache folder per test session, models
with large random weights, and run and model folders to write and edit."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from transformer_lm.checkpoint import save_checkpoint
from transformer_lm.config import ModelConfig, dump_json
from transformer_lm.model import Transformer
from transformer_lm.tokenizers import ByteTokenizer, Tokenizer, save_tokenizer


def make_corpus(n_lines: int = 400, seed: int = 0) -> str:
    """Python-looking text with a few non-ASCII characters, deterministic."""
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "naïve", "größe", "total", "value"]
    lines = []
    for i in range(n_lines):
        a, b = rng.sample(names, 2)
        lines.append(rng.choice([f"def {a}_{i}({b}):", f"    return {a} + {b} * {i}", f"{a} = [{b}, {i}]  # ✓",
                                 f"    if {a} > {i}:", "", f"class {a.title()}:"]))
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test models are tiny, so each op is dispatch-bound: one intra-op thread is as fast, and immune to OpenMP
    spin-waits on a busy machine (measured under load: 35 training steps took 16 s with 2 threads, 0.5 s with 1).
    OMP_NUM_THREADS carries the same setting to the `tlm` processes some tests start."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw text given to `tlm train` is prepared into a cache: keep it out of the user's home."""
    monkeypatch.setenv("TLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tlm-cache"))


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_corpus(), encoding="utf-8")
    return path


def random_model(config: ModelConfig, seed: int = 0, std: float = 0.3) -> Transformer:
    """A model with *large* random weights (norm gains around 1, biases included): GPT-2's 0.02 init makes attention
    almost uniform and logits almost flat, which would let a wrong mask, head split or transpose pass unnoticed."""
    model = Transformer(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith(("norm1.weight", "norm2.weight", "norm.weight"))
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if gain else 0.0))
    return model.eval()


def write_run(folder: Path, config: ModelConfig, tokenizer: Tokenizer | None = None) -> Path:
    """A run folder as `tlm train` leaves it, without training: config, tokenizer, one checkpoint."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(dump_json({"model": config.to_dict()}))
    save_tokenizer(tokenizer or ByteTokenizer(), folder / "tokenizer.json")
    save_checkpoint(folder, Transformer(config).init_weights(seed=0), {}, 1)
    return folder


def copy_folder(folder: Path, dest: Path) -> Path:
    """A copy of `folder` at `dest`, to edit without touching a shared fixture's folder."""
    shutil.copytree(folder, dest)
    return dest


def edit_json(path: Path, **changes: object) -> None:
    """Update the JSON object in `path` with `changes`."""
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>"]


def chat_rust_tokenizer():
    """A small byte-level BPE (a Hugging Face `tokenizers` object) with the special tokens of ChatML and Llama 3's
    chat format."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    texts = ["def alpha(beta):\n    return beta * 2\n" * 20, "naïve größe ✓ x = [1, 2]\nuser assistant system\n" * 5]
    rust.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=CHAT_SPECIALS,
                                                        show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return rust
