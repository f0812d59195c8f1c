"""Every end-of-sequence id of an imported model ends its samples, as transformers' generate ends there: a tiny
Llama-3-style folder (tokenizer_config's eos_token, config.json's and generation_config.json's eos_token_id lists)
imported, sampled against transformers' generate, and exported back. CPU only, downloads nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import copy_folder, edit_json, write_run
from transformer_lm.api import load_run
from transformer_lm.cli import main
from transformer_lm.config import ModelConfig
from transformer_lm.generate import generate
from transformer_lm.interop.hf import export_hf, import_hf, load_hf_tokenizer
from transformer_lm.tokenizers import BPETokenizer

transformers = pytest.importorskip("transformers")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama folder whose end-of-sequence ids are spread as in published ones: tokenizer_config.json's eos_token
    <|end_of_text|>, config.json's eos_token_id [<|end_of_text|>, <|eom_id|>] (Llama 3.1 lists three there) and
    generation_config.json's [<|end_of_text|>, <|eom_id|>, <|eot_id|>] (Qwen2.5-Instruct lists one there that
    config.json lacks). The LM head rows of <|eom_id|> and <|eot_id|> are those of two tokens greedy decoding draws,
    scaled up, so that samples end at them; the embedding table is the tokenizer's size, so that the ids tlm draws
    from the tokenizer's vocabulary are all the model's."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.train_from_iterator(["def alpha(beta):\n    return beta * 2\n" * 20, "naïve größe ✓ x = [1, 2]\n" * 5],
                             trainers.BpeTrainer(vocab_size=300, special_tokens=LLAMA3_SPECIALS, show_progress=False,
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bot, end, eom, eot = (rust.token_to_id(t) for t in LLAMA3_SPECIALS)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                                      vocab_size=rust.get_vocab_size(), bos_token_id=bot, eos_token_id=[end, eom])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        prompt = torch.tensor([[bot, 40, 41, 42]])
        free = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=end)[0, 4:].tolist()
        head = model.lm_head.weight
        head[eom], head[eot] = head[free[4]] * 1.5, head[free[9]] * 1.5
    folder = tmp_path_factory.mktemp("hf-llama3")
    model.save_pretrained(folder)
    edit_json(folder / "generation_config.json", eos_token_id=[end, eom, eot])
    transformers.PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<|begin_of_text|>",
                                         eos_token="<|end_of_text|>").save_pretrained(folder)
    return folder


def test_import_keeps_every_end_of_sequence_id(llama3_folder, tmp_path):
    """eot_id (the document separator) is tokenizer_config.json's eos_token; the sample's stop ids are it and every
    other id config.json and generation_config.json list, in the run folder too."""
    run = load_run(import_hf(llama3_folder, tmp_path / "run"), "cpu")
    ids = [run.tokenizer.hf.token_to_id(t) for t in LLAMA3_SPECIALS[1:]]
    assert run.tokenizer.eot_id == ids[0]
    assert run.tokenizer.stop_ids == tuple(ids)

    # without tokenizer_config.json's eos_token, config.json's first id is the separator
    folder = copy_folder(llama3_folder, tmp_path / "no-eos-token")
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in tc.items() if k != "eos_token"}))
    edit_json(folder / "config.json", eos_token_id=[ids[2], ids[1]])
    (folder / "generation_config.json").unlink()
    tok = load_hf_tokenizer(folder)
    assert (tok.eot_id, tok.stop_ids) == (ids[2], (ids[2], ids[1]))


def test_samples_end_where_transformers_generate_ends(llama3_folder, tmp_path, capsys):
    """Greedy ids equal transformers' generate with the folder's own generation config, where it stops included: at
    <|eom_id|> (config.json's second id), at <|eot_id|> (generation_config.json's alone), or nowhere. The text of
    the API (plain and speculative) and of `tlm sample` is that of the ids before the stop."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama3_folder).eval()
    run_dir = import_hf(llama3_folder, tmp_path / "run")
    run = load_run(run_dir, "cpu")
    tok = run.tokenizer
    bot, end, eom, eot = (tok.hf.token_to_id(t) for t in LLAMA3_SPECIALS)
    ended = []
    for text in ("def", " x = [1, 2]", "a", "naïve größe", "größe"):
        # this tokenizer adds no BOS, so the API's prompt is the text's ids; with one, "größe" runs to the limit
        prompt = tok.encode(text) if text != "größe" else [bot, *tok.encode(text)]
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=30, do_sample=False, pad_token_id=end)[0, len(prompt):].tolist()
        assert list(generate(run.model, prompt, 30, temperature=0, stop_ids=tok.stop_ids)) == ref
        ended.append(ref[-1] if len(ref) < 30 else None)
        if prompt[0] == bot:
            continue
        sample = tok.decode(ref[:-1])
        assert run.generate(text, max_new_tokens=30, greedy=True) == sample
        assert run.use_draft(run, k=3).generate(text, max_new_tokens=30, greedy=True) == sample
        run.use_draft(None)
        capsys.readouterr()
        assert main(["sample", str(run_dir), text, "--max_new_tokens", "30", "--greedy", "true", "--device",
                     "cpu"]) == 0
        assert capsys.readouterr().out == text + sample + "\n"
    assert ended == [eom, eot, eot, eom, None]


def test_export_lists_every_end_of_sequence_id(llama3_folder, tmp_path):
    """config.json and generation_config.json of the export list the run's stop ids, so that transformers' generate
    on the exported folder (its own settings, no eos given) stops where tlm does; importing it again keeps them."""
    run_dir = import_hf(llama3_folder, tmp_path / "run")
    tok = load_run(run_dir, "cpu").tokenizer
    out = export_hf(run_dir, tmp_path / "hf")
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / name).read_text())["eos_token_id"] == list(tok.stop_ids)
    again = load_run(import_hf(out, tmp_path / "again"), "cpu")
    assert (again.tokenizer.eot_id, again.tokenizer.stop_ids) == (tok.eot_id, tok.stop_ids)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ended = set()
    for text in ("def", " x = [1, 2]"):
        prompt = torch.tensor([tok.encode(text)])
        ref = back.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                            pad_token_id=tok.eot_id)[0, prompt.size(1):].tolist()
        assert list(generate(again.model, prompt[0].tolist(), 30, temperature=0, stop_ids=tok.stop_ids)) == ref
        ended.add(ref[-1])
    assert ended == set(tok.stop_ids[1:])  # <|eom_id|> and <|eot_id|>

    # a tokenizer with one end-of-text id exports it as one int, as before
    bpe = BPETokenizer.train(["def alpha(beta):\n    return beta\n" * 10], vocab_size=280)
    single = export_hf(write_run(tmp_path / "bpe", ModelConfig.from_preset("tiny-llama", vocab_size=280), bpe),
                       tmp_path / "hf-bpe")
    for name in ("config.json", "generation_config.json"):
        assert json.loads((single / name).read_text())["eos_token_id"] == bpe.eot_id
    assert not (export_hf(write_run(tmp_path / "byte", ModelConfig.from_preset("tiny-llama", vocab_size=256)),
                          tmp_path / "hf-byte") / "generation_config.json").exists()
