"""Hugging Face interop through the production converter (transformer_lm.interop.hf): for each family a tiny
random-weight model built from a config with transformers' own classes, saved with save_pretrained, imported, and
compared with transformers (logits and greedy generation); export → from_pretrained; import → export → import; the
presets' published sizes; and the errors. CPU only, downloads nothing."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import copy_folder, edit_json, write_run
from transformer_lm import checkpoint
from transformer_lm.accounting import count_params
from transformer_lm.api import load_run
from transformer_lm.checkpoint import latest_checkpoint
from transformer_lm.cli import main
from transformer_lm.config import ModelConfig
from transformer_lm.errors import CheckpointError, ConversionError, RunExistsError
from transformer_lm.generate import generate
from transformer_lm.interop import hf as hf_module
from transformer_lm.interop.hf import export_hf, import_hf, load_hf, load_hf_tokenizer
from transformer_lm.model import Transformer
from transformer_lm.tokenizers import BPETokenizer

transformers = pytest.importorskip("transformers")

VOCAB = 320  # larger than the tokenizer's ids, as in published models whose embedding tables are padded
WINDOW = 8


def _rope(**params: object) -> dict[str, object]:
    """RoPE settings as this transformers spells them: 5.x takes one `rope_parameters` dict, 4.x a top-level
    `rope_theta` and a `rope_scaling` dict (and ignores `rope_parameters`), so each config file the tests save is
    in its version's own format, as published checkpoints are."""
    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": params}
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_theta": params["rope_theta"], "rope_scaling": scaling if scaling["rope_type"] != "default" else None}


def hf_configs() -> dict[str, object]:
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, vocab_size=VOCAB)
    return {
        "gpt2": transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=VOCAB,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                        eos_token_id=None),
        "llama": transformers.LlamaConfig(**common, tie_word_embeddings=False, **_rope(
            rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16)),
        "mistral": transformers.MistralConfig(**common, sliding_window=WINDOW),
        "qwen2": transformers.Qwen2Config(**common, tie_word_embeddings=True,
                                          **_rope(rope_type="default", rope_theta=1e6)),
    }


FAMILIES = list(hf_configs())


def _save_tokenizer(folder: Path) -> None:
    """A small byte-level BPE saved the way transformers saves a fast tokenizer."""
    tok = BPETokenizer.train(["def alpha(beta):\n    return beta * 2\n" * 20, "naïve größe ✓ x = [1, 2]\n" * 5],
                             vocab_size=300)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[object, Path]]:
    """family → (transformers model in eval mode, the folder it was saved to with a tokenizer)."""
    out = {}
    for family, config in hf_configs().items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # far from the 0.02 init, so attention is not near-uniform and a wrong mask shows
            gen = torch.Generator().manual_seed(1)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        folder = tmp_path_factory.mktemp(f"hf-{family}")
        model.save_pretrained(folder)
        _save_tokenizer(folder)
        out[family] = (model, folder)
    return out


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------------
# Import: parity with transformers


def test_import_never_replaces_its_source(hf_models, tmp_path):
    _, folder = hf_models["gpt2"]
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    for out in (folder, folder.parent):
        with pytest.raises(RunExistsError, match="which this command reads"):
            import_hf(folder, out, overwrite=True)
    assert before == {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_transformers(hf_models, family, tmp_path):
    hf, folder = hf_models[family]
    run = import_hf(folder, tmp_path / "run")
    loaded = load_run(run, "cpu")
    ours = loaded.model
    assert loaded.config["source"]["model_type"] == family
    ids = _ids(2, 40)
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids).logits
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    prompt = _ids(1, 20, seed=7)  # longer than Mistral's window of 8
    # an explicit attention mask: otherwise transformers takes prompt ids equal to pad_token_id for padding
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, 20:].tolist()
    mine = list(generate(ours, prompt[0].tolist(), 20, temperature=0))
    assert len(ref) == 20
    assert mine == ref
    assert len(set(mine)) > 1

    # the tokenizer came along, with the EOS the folder names
    text = "def alpha(beta):\n    return beta * 2\n"
    assert loaded.tokenizer.encode(text) == transformers.PreTrainedTokenizerFast.from_pretrained(folder).encode(text)
    assert loaded.tokenizer.eot_id == loaded.tokenizer.hf.token_to_id("<|endoftext|>")


def test_sliding_window_changes_the_result(hf_models):
    """The Mistral comparison above proves the window, not a coincidence: without it the logits differ."""
    hf, folder = hf_models["mistral"]
    ours, _ = load_hf(folder)
    assert ours.config.sliding_window == WINDOW
    unwindowed = Transformer(ModelConfig(**{**ours.config.to_dict(), "sliding_window": None})).eval()
    unwindowed.load_state_dict(ours.state_dict())
    ids = _ids(1, 30)
    with torch.no_grad():
        assert not torch.allclose(unwindowed(ids).logits[:, WINDOW:], ours(ids).logits[:, WINDOW:], atol=1e-3)
        torch.testing.assert_close(unwindowed(ids).logits[:, :WINDOW], ours(ids).logits[:, :WINDOW])


def test_import_keeps_bf16_and_casts_on_request(hf_models, tmp_path):
    hf, folder = hf_models["qwen2"]
    bf16 = tmp_path / "bf16"
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(bf16)
    _save_tokenizer(bf16)
    model, _ = load_hf(bf16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_hf(bf16, torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_sharded_import_equals_single_file(hf_models, tmp_path):
    hf, folder = hf_models["llama"]
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    one, _ = load_hf(folder)
    many, _ = load_hf(sharded)
    for (k, a), (k2, b) in zip(one.state_dict().items(), many.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_and_round_trips(hf_models, family, tmp_path):
    hf, folder = hf_models[family]
    run = import_hf(folder, tmp_path / "run")
    exported = export_hf(run, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert back.config.model_type == family
    ids = _ids(2, 40, seed=5)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)

    # transformers 5's AutoTokenizer replaces the pre-tokenizer of any model_type qwen2 folder by Qwen2's own, which
    # only a real Qwen2 tokenizer matches; this test's small BPE is read as written with PreTrainedTokenizerFast.
    reader = transformers.PreTrainedTokenizerFast if family == "qwen2" else transformers.AutoTokenizer
    text = "naïve größe ✓ x = [1, 2]\n"
    assert reader.from_pretrained(exported).encode(text) == load_run(run).tokenizer.encode(text)

    again = import_hf(exported, tmp_path / "run2")
    a, b = load_run(run, "cpu").model.state_dict(), load_run(again, "cpu").model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert json.loads((run / "config.json").read_text())["model"] == json.loads((again / "config.json").read_text())[
        "model"]


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama", "tiny-mistral", "tiny-qwen2"])
def test_export_of_trained_presets_with_the_byte_tokenizer(preset, tmp_path):
    """Our own runs (here freshly initialized) export to the family their architecture matches; the byte tokenizer
    becomes a byte-level tokenizer.json whose ids are the byte values."""
    config = ModelConfig.from_preset(preset, vocab_size=256, block_size=64)
    run = write_run(tmp_path / "run", config)
    out = export_hf(run, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, load_run(run, "cpu").model(ids).logits, atol=1e-4, rtol=1e-4)
    text = "héllo\n  wörld ✓"
    assert transformers.AutoTokenizer.from_pretrained(out).encode(text) == list(text.encode("utf-8"))


def _files(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_overwrite_never_replaces_a_hugging_face_folder(hf_models, tmp_path):
    """convert and export --overwrite took any folder with a config.json for one tlm wrote: a mistyped --out naming
    another downloaded model deleted it. A run is recognised by its config's model section, an export by the mark in
    its safetensors header."""
    other = copy_folder(hf_models["qwen2"][1], tmp_path / "other")
    before = _files(other)
    run = import_hf(hf_models["llama"][1], tmp_path / "run")
    for write in (lambda: import_hf(hf_models["llama"][1], other, overwrite=True),
                  lambda: export_hf(run, other, overwrite=True)):
        with pytest.raises(RunExistsError, match="tlm wrote, and --overwrite replaces only such a folder"):
            write()
        assert _files(other) == before
    assert import_hf(hf_models["gpt2"][1], run, overwrite=True) == run  # an imported run is still replaced
    assert load_run(run, "cpu").config["source"]["model_type"] == "gpt2"
    out = export_hf(run, tmp_path / "export")
    assert export_hf(run, out, overwrite=True) == out  # and an export of ours


def test_a_failed_overwrite_keeps_the_previous_folder(hf_models, tmp_path, monkeypatch):
    """--overwrite emptied the old export or run before writing the new one, so a failure part-way (here a full
    disk while the weights are written) left an empty folder; the new one is now staged beside it and moved in."""
    _, folder = hf_models["llama"]
    run = import_hf(folder, tmp_path / "run")
    out = export_hf(run, tmp_path / "hf")
    before = _files(run), _files(out)
    monkeypatch.setattr(hf_module, "save_tensors", _full_disk)  # the export's weights
    monkeypatch.setattr(checkpoint, "save_tensors", _full_disk)  # the import's checkpoint
    with pytest.raises(OSError, match="No space"):
        export_hf(run, out, overwrite=True)
    with pytest.raises(OSError, match="No space"):
        import_hf(folder, run, overwrite=True)
    assert (_files(run), _files(out)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no staging folder left behind
    (tmp_path / "notes.txt").write_text("mine")  # a file at --out is no folder to replace
    monkeypatch.undo()
    with pytest.raises(RunExistsError, match="is a file"):
        export_hf(run, tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------------------------------
# Errors: typed in the library, one line and exit 2 through the CLI


def test_unsupported_model_type(hf_models, tmp_path, capsys):
    folder = copy_folder(hf_models["llama"][1], tmp_path / "src")
    edit_json(folder / "config.json", model_type="falcon")
    with pytest.raises(ConversionError, match="unsupported model_type 'falcon'"):
        import_hf(folder, tmp_path / "run")
    assert main(["convert", str(folder), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tlm: error:") and err.count("\n") == 1 and "falcon" in err


def test_a_source_that_is_no_model_folder_is_named(tmp_path, capsys):
    """A weights file (or empty folder) passed to convert was reported as 'cannot read model config
    stories.pt/config.json (Not a directory)'; a PyTorch .bin was asked for its llama2.c tokenizer."""
    torch.save({"w": torch.zeros(64)}, tmp_path / "model.pt")
    torch.save({"w": torch.zeros(64)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "empty").mkdir()
    for src, expected in (("model.pt", "is not a Hugging Face model folder (no config.json)"),
                          ("empty", "is not a Hugging Face model folder (no config.json)"),
                          ("pytorch_model.bin", "is not a llama2.c checkpoint")):
        assert main(["convert", str(tmp_path / src), "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "run").exists()


def test_config_weights_shape_mismatch(hf_models, tmp_path):
    folder = copy_folder(hf_models["mistral"][1], tmp_path / "src")
    edit_json(folder / "config.json", intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"ffn\.\w+\.weight has shape"):
        load_hf(folder)
    folder = copy_folder(hf_models["llama"][1], tmp_path / "src2")
    edit_json(folder / "config.json", attention_bias=True, mlp_bias=True)
    with pytest.raises(CheckpointError, match="lack"):
        load_hf(folder)


def test_missing_and_mismatched_shards(hf_models, tmp_path):
    hf = hf_models["llama"][0]
    folder = tmp_path / "sharded"
    hf.save_pretrained(folder, max_shard_size="100KB")
    _save_tokenizer(folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1

    moved = dict(index, weight_map={**index["weight_map"], "model.norm.weight": next(
        s for s in shards if s != index["weight_map"]["model.norm.weight"])})
    index_path.write_text(json.dumps(moved))
    with pytest.raises(CheckpointError, match="does not match"):
        load_hf(folder)

    index_path.write_text(json.dumps(index))
    os.remove(folder / shards[0])
    with pytest.raises(CheckpointError, match=f"missing shard {shards[0]}"):
        load_hf(folder)


def test_gpt2_weights_without_the_transformer_prefix(hf_models, tmp_path):
    """OpenAI's own GPT-2 upload names its tensors wte.weight, h.0.attn..., with no "transformer." prefix: the import
    asked the file for the prefixed names and crashed."""
    hf, folder = hf_models["gpt2"]
    src = copy_folder(folder, tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, src / "model.safetensors")
    assert transformers.GPT2LMHeadModel.from_pretrained(src).transformer.h[0].ln_1.weight.equal(
        hf.transformer.h[0].ln_1.weight)  # transformers reads this layout too
    ids = _ids(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(load_hf(src)[0](ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family,dropped", [("llama", "rms_norm_eps"), ("mistral", "sliding_window"),
                                            ("mistral", "num_key_value_heads")])
def test_a_missing_config_field_means_what_it_means_to_transformers(hf_models, tmp_path, family, dropped):
    """A config.json without rms_norm_eps, sliding_window or num_key_value_heads: transformers takes its defaults
    (1e-6, a 4096-token window, 8 KV heads for Mistral), which tlm took as its own (1e-5, none, the head count)."""
    src = copy_folder(hf_models[family][1], tmp_path / "src")
    d = json.loads((src / "config.json").read_text())
    del d[dropped]
    (src / "config.json").write_text(json.dumps(d))
    theirs = transformers.AutoConfig.from_pretrained(src)
    ours = load_hf(src)[0].config if dropped != "num_key_value_heads" else None
    if dropped == "rms_norm_eps":
        assert ours.norm_eps == theirs.rms_norm_eps == 1e-6
    elif dropped == "sliding_window":
        assert ours.sliding_window == theirs.sliding_window == 4096
    else:  # 8 KV heads for 4 heads: refused, as transformers' attention cannot run it either
        assert theirs.num_key_value_heads == 8
        with pytest.raises(ConversionError, match=r"n_head \(4\) must be divisible by model.n_kv_head \(8\)"):
            load_hf(src)


@pytest.mark.parametrize("rope", [{"rope_parameters": {"rope_type": "llama3", "factor": 4.0, "rope_theta": 1e4},
                                   "rope_scaling": None},  # (transformers 4.x wrote the full llama3 settings there)
                                  {"rope_parameters": [1, 2]}, {"rope_theta": "abc", "rope_parameters": None}])
def test_malformed_rope_settings_are_one_line_errors(hf_models, tmp_path, capsys, rope):
    src = copy_folder(hf_models["llama"][1], tmp_path / "src")
    edit_json(src / "config.json", **rope)
    assert main(["convert", str(src), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tlm: error: the rope settings of config.json") and err.count("\n") == 1, err


def test_a_config_field_of_the_wrong_type_is_named(hf_models, tmp_path):
    src = copy_folder(hf_models["llama"][1], tmp_path / "src")
    edit_json(src / "config.json", num_attention_heads="4")
    with pytest.raises(ConversionError, match="n_head must be an integer, got .4."):
        load_hf(src)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_llama3_rope_scaling_round_trips_through_mistral_and_qwen2(tmp_path, family):
    """llama3 rope scaling (transformers runs it for every rope family) was imported, then refused by export."""
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, vocab_size=VOCAB)
    rope = _rope(rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=16)
    config = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[family](**common, **rope)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(tmp_path / "src")
    _save_tokenizer(tmp_path / "src")
    run = import_hf(tmp_path / "src", tmp_path / "run")
    out = export_hf(run, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(1, 60)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_non_representable_export(tmp_path, capsys):
    run = write_run(tmp_path / "run", ModelConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=32,
                                                   pos_encoding="sinusoidal"))
    with pytest.raises(ConversionError, match="pos_encoding is 'sinusoidal'"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sinusoidal" in err

    gqa = write_run(tmp_path / "gqa", ModelConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_kv_head=1,
                                                   n_embd=32))
    with pytest.raises(ConversionError, match="grouped-query"):
        export_hf(gqa, tmp_path / "hf2")
    rope = write_run(tmp_path / "rope", ModelConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=32,
                                                     pos_encoding="rope", norm="rmsnorm", mlp="swiglu"))
    with pytest.raises(ConversionError, match=r"gpt2 needs 'learned' \(exportable as llama\)"):
        export_hf(rope, tmp_path / "hf4", family="gpt2")  # it said no Hugging Face family has rope
    # rope with layernorm: llama suggested gpt2 (for the norm) and gpt2 suggested llama (for rope); neither takes both
    ln = write_run(tmp_path / "ln", ModelConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=32,
                                                 pos_encoding="rope"))
    for family in ("llama", "gpt2"):
        with pytest.raises(ConversionError, match=r"needs .*\(no Hugging Face family has this combination\)"):
            export_hf(ln, tmp_path / "hf3", family=family)


# ----------------------------------------------------------------------------------------------------------------------
# The CLI end to end, and the presets' published sizes


def test_cli_convert_sample_export(hf_models, tmp_path, capsys):
    folder = hf_models["qwen2"][1]
    run = tmp_path / "run"
    assert main(["convert", str(folder), "--out", str(run)]) == 0
    assert latest_checkpoint(run) is not None
    assert main(["sample", str(run), "def", "--max_new_tokens", "5", "--greedy", "true", "--device", "cpu"]) == 0
    assert main(["info", str(run), "--json", "true"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert main(["convert", str(folder), "--out", str(run)]) == 2  # an existing run is not replaced silently


def llama_closed_form(vocab: int, d: int, n_layer: int, n_head: int, n_kv: int, ffn: int, tied: bool,
                      qkv_bias: bool = False) -> int:
    """Per layer: q and o (d² each), k and v (d · n_kv·hd each), gate/up/down (3·d·ffn), two RMSNorm gains (2d), and
    Qwen2's Q/K/V biases; plus the token table, an untied head and the final norm."""
    hd = d // n_head
    kv = n_kv * hd
    layer = 2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d + ((d + 2 * kv) if qkv_bias else 0)
    return vocab * d * (1 if tied else 2) + n_layer * layer + d


# (official config.json values) → published parameter count
PUBLISHED = {
    "llama-3.2-1b": ((128256, 2048, 16, 32, 8, 8192, True), 1_235_814_400),
    "llama-2-7b": ((32000, 4096, 32, 32, 32, 11008, False), 6_738_415_616),
    "mistral-7b": ((32000, 4096, 32, 32, 8, 14336, False), 7_241_732_096),
    "qwen2-0.5b": ((151936, 896, 24, 14, 2, 4864, True, True), 494_032_768),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_llama_family_preset_sizes(name):
    args, published = PUBLISHED[name]
    assert llama_closed_form(*args) == published
    config = ModelConfig.from_preset(name)
    assert count_params(config).total == published
    with torch.device("meta"):
        assert Transformer(config).num_params() == published


@pytest.mark.parametrize(("bias", "qkv_bias"), [(False, True), (True, False), (False, None), (True, None)])
def test_count_params_with_qkv_bias(bias, qkv_bias):
    config = ModelConfig.from_preset("tiny-qwen2", bias=bias, qkv_bias=qkv_bias, tie_embeddings=False)
    with torch.device("meta"):
        assert count_params(config).total == Transformer(config).num_params()


def test_char_tokenizer_exports_weights_only_with_a_warning(tmp_path, caplog):
    from transformer_lm.tokenizers import CharTokenizer

    tok = CharTokenizer("abcdefgh ")
    run = write_run(tmp_path / "run", ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size), tok)
    with caplog.at_level("WARNING"):
        out = export_hf(run, tmp_path / "hf")
    assert "no Hugging Face tokenizer.json form" in caplog.text
    assert not (out / "tokenizer.json").exists()
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.vocab_size == tok.vocab_size


def test_bos_is_kept_only_when_the_tokenizer_adds_it(hf_models, tmp_path):
    """A Llama-style tokenizer.json adds <s> itself: tlm keeps it as bos_id (and EOS </s> ends samples). A tokenizer
    that names a BOS but never adds it (GPT-2) gets none, so prompts are encoded as transformers encodes them."""
    from tokenizers import processors

    tok = BPETokenizer.train(["def alpha(beta):\n    return beta\n" * 10], vocab_size=280)
    tok.hf.add_special_tokens(["<s>", "</s>"])
    bos = tok.hf.token_to_id("<s>")
    for adds in (False, True):  # the post-processor is set on the second pass
        folder = copy_folder(hf_models["llama"][1], tmp_path / f"llama-{adds}")
        if adds:
            tok.hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok.hf, bos_token="<s>", eos_token="</s>"
                                             ).save_pretrained(folder)
        loaded = load_run(import_hf(folder, tmp_path / f"run-{adds}"), "cpu").tokenizer
        assert loaded.eot_id == tok.hf.token_to_id("</s>")
        assert loaded.bos_id == (bos if adds else None)
        assert (loaded.encode("def")[0] == bos) is adds


def test_a_tokenizer_that_encodes_text_to_nothing_is_refused(hf_models, tmp_path, capsys):
    """transformers 5 builds GPT2TokenizerFast(vocab_file=, merges_file=) with one token and saves it so: every text
    encodes to no ids. Such a folder would import, then train on empty data and sample nothing; it is refused."""
    files = tmp_path / "gpt2-files"
    files.mkdir()
    encoder = {chr(c): i for i, c in enumerate(range(ord("!"), ord("~") + 1))} | {"<|endoftext|>": 94}
    (files / "encoder.json").write_text(json.dumps(encoder))
    (files / "vocab.bpe").write_text("#version: 0.2\nt h\n")
    broken = transformers.GPT2TokenizerFast(vocab_file=str(files / "encoder.json"),
                                            merges_file=str(files / "vocab.bpe"))
    folder = copy_folder(hf_models["gpt2"][1], tmp_path / "gpt2")
    (folder / "tokenizer.json").unlink()
    broken.save_pretrained(folder)
    if broken("The fox").input_ids:  # a transformers that builds it right: the folder is fine, and imports
        import_hf(folder, tmp_path / "fine")
        pytest.skip("this transformers builds GPT2TokenizerFast from vocab files correctly")
    assert main(["convert", str(folder), "--out", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err.strip()
    assert "encodes 'The quick brown fox" in err and "save it again" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers imported with a model, on varied text

VARIED = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60) | st.sampled_from([
    "def alpha(beta):\n    return beta * 2\n", "  leading, double  spaces ", "naïve größe ✓ 日本語 😀", "\t\r\n", ""])


@settings(max_examples=150, deadline=None)
@given(text=VARIED)
def test_imported_tokenizer_json_matches_transformers(hf_models, text):
    _, folder = hf_models["llama"]
    ours = load_hf_tokenizer(folder)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text


@pytest.fixture(scope="module")
def sentencepiece_folder(hf_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llama folder with a SentencePiece tokenizer.model instead of tokenizer.json (older Llama/Mistral repos)."""
    spm = pytest.importorskip("sentencepiece")
    work = tmp_path_factory.mktemp("spm")
    (work / "corpus.txt").write_text("Once upon a time there was a little model that liked numbers 123 and words.\n"
                                     * 50 + "naïve café Grüße\n" * 10)
    spm.SentencePieceTrainer.train(input=str(work / "corpus.txt"), model_prefix=str(work / "sp"), vocab_size=310,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1)
    folder = tmp_path_factory.mktemp("hf-llama-spm")
    for f in hf_models["llama"][1].iterdir():
        if not f.name.startswith("tokenizer") and f.name != "special_tokens_map.json":
            shutil.copy(f, folder / f.name)
    shutil.copy(work / "sp.model", folder / "tokenizer.model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "bos_token_id": 1, "eos_token_id": 2}))
    return folder


@settings(max_examples=100, deadline=None)
@given(text=VARIED)
def test_imported_tokenizer_model_matches_sentencepiece(sentencepiece_folder, text):
    import sentencepiece as spm

    tok = load_hf_tokenizer(sentencepiece_folder)
    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_folder / "tokenizer.model"))
    assert tok.encode(text) == sp.encode(text)
    assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))


def test_import_with_tokenizer_model_stops_at_eos(sentencepiece_folder, tmp_path):
    run = load_run(import_hf(sentencepiece_folder, tmp_path / "run"), "cpu")
    assert run.tokenizer.kind == "sentencepiece"
    assert (run.tokenizer.bos_id, run.tokenizer.eot_id) == (1, 2)  # BOS starts prompts, EOS ends samples
    assert isinstance(run.generate("Once upon", max_new_tokens=5, seed=0), str)


# ----------------------------------------------------------------------------------------------------------------------
# Several end-of-sequence ids (Llama 3.x, Qwen2.5 instruct folders)

def test_sentencepiece_import_keeps_every_end_of_sequence_id(sentencepiece_folder, tmp_path):
    folder = copy_folder(sentencepiece_folder, tmp_path / "spm")
    edit_json(folder / "config.json", eos_token_id=[2, 5])
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    run = load_run(import_hf(folder, tmp_path / "run"), "cpu")
    assert (run.tokenizer.eot_id, run.tokenizer.stop_ids) == (2, (2, 5, 7))
