"""PEFT interop (interop/peft.py): a LoRA fine-tune's adapters exported as a PEFT adapter folder, which PeftModel
puts on the base's Hugging Face export with our merged fine-tune's logits (every layer or some: train.lora_targets),
and a PEFT-made adapter merged onto a run of its base with PeftModel.merge_and_unload()'s logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_corpus, random_model
from transformer_lm.api import load_run
from transformer_lm.checkpoint import save_checkpoint
from transformer_lm.cli import main
from transformer_lm.config import ModelConfig, TrainConfig
from transformer_lm.train import train
from transformer_lm.train_data import training_data

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)


def _lora(**kw) -> TrainConfig:
    base = dict(batch_size=4, max_iters=6, eval_interval=6, eval_batches=2, log_interval=1, warmup_iters=2, lr=1e-2,
                lora_rank=4, lora_alpha=8.0)
    return TrainConfig(**{**base, **kw})


LLAMA_ARCH = {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_head": 1,
              "tie_embeddings": False}


@pytest.mark.parametrize("arch, targets, modules", [
    ({}, None, ["c_attn", "c_proj", "c_fc"]), (LLAMA_ARCH, None, None),
    ({}, ["proj"], ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]),  # not the MLP's c_proj
    (LLAMA_ARCH, ["qkv", "down"], ["q_proj", "k_proj", "v_proj", "down_proj"])],
    ids=["gpt2", "llama", "gpt2-attention-proj", "llama-qkv-down"])
def test_lora_adapters_export_for_peft_on_the_bases_export(arch, targets, modules, tmp_path: Path, capsys):
    """`tlm export RUN --adapters true`: PEFT's PeftModel, given the base's Hugging Face export and these adapters,
    computes the logits of our merged fine-tune (our fused qkv adapter as Llama's q/k/v ones), also of adapters on
    some layers only (train.lora_targets), whose target_modules name those alone."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from conftest import write_run
    from transformer_lm.interop.hf import export_hf

    config = ModelConfig(**{**SMALL, **arch})
    base = write_run(tmp_path / "base", config)
    save_checkpoint(base, random_model(config, std=0.1), {}, 1)
    other = tmp_path / "other.txt"
    other.write_text(make_corpus(seed=5))
    data = training_data(other, load_run(base, "cpu").tokenizer)
    chosen = {} if targets is None else {"lora_targets": targets}
    train(config, _lora(init_from=str(base), max_iters=4, eval_interval=4, lr=3e-2, **chosen), data,
          tmp_path / "lora", progress=False)
    export_hf(base, tmp_path / "hf-base")
    assert main(["export", str(tmp_path / "lora"), "--out", str(tmp_path / "adapter"), "--adapters", "true"]) == 0
    if modules is not None:
        assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"] == modules
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-base"),
                                        tmp_path / "adapter").eval()
    ids = torch.from_numpy(data.val[:16].astype(np.int64))[None]
    ours = load_run(tmp_path / "lora", "cpu").model
    with torch.no_grad():
        want, got = ours(ids).logits, hf(ids).logits
        plain = load_run(base, "cpu").model(ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapters changed something
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert main(["export", str(base), "--out", str(tmp_path / "nope"), "--adapters", "true"]) == 2
    assert "is not a LoRA fine-tune" in capsys.readouterr().err
    # and back: the adapter merged onto the base is our merged fine-tune
    assert main(["convert", str(tmp_path / "adapter"), "--base", str(base), "--out", str(tmp_path / "back")]) == 0
    back = load_run(tmp_path / "back", "cpu").model.state_dict()
    assert all(torch.allclose(v, back[k], atol=1e-6) for k, v in ours.state_dict().items())
    assert main(["convert", str(tmp_path / "adapter"), "--out", str(tmp_path / "no-base")]) == 2
    assert "is a PEFT adapter, not a model: give the run of the model it adapts, --base RUN" in capsys.readouterr().err


def test_a_peft_adapter_merges_as_peft_merges_it(tmp_path: Path, capsys):
    """An adapter PEFT made (q_proj and v_proj only, rsLoRA's scale), merged by `tlm convert --base`:
    the logits of PeftModel.merge_and_unload()'s model; adapters tlm cannot merge are refused by name."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from conftest import write_run
    from transformer_lm.interop.hf import export_hf

    config = ModelConfig(**{**SMALL, **LLAMA_ARCH})
    base = write_run(tmp_path / "base", config)
    save_checkpoint(base, random_model(config, std=0.1), {}, 1)
    export_hf(base, tmp_path / "hf-base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-base")
    lora = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   use_rslora=True))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    lora.save_pretrained(tmp_path / "adapter")
    assert main(["convert", str(tmp_path / "adapter"), "--base", str(base), "--out", str(tmp_path / "merged")]) == 0
    ids = torch.arange(16)[None] % config.vocab_size
    with torch.no_grad():
        want = lora.merge_and_unload()(ids).logits
        got = load_run(tmp_path / "merged", "cpu").model(ids).logits
        plain = load_run(base, "cpu").model(ids).logits
    assert (want - plain).abs().max() > 1e-2 and torch.allclose(got, want, atol=1e-4)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    assert main(["convert", str(tmp_path / "adapter"), "--base", str(base), "--out", str(tmp_path / "dora")]) == 2
    assert "uses use_dora, which tlm does not merge" in capsys.readouterr().err
