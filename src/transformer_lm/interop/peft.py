"""PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors), the form Hugging Face's peft saves, the Hub
shares and vLLM/TGI serve beside a base model: exported from a run fine-tuned with train.lora_rank, and imported
(merged) onto a run of the base model they adapt.

The names are hf.py's key maps: an adapter of HF module M (its ".weight" key) adapts the weight that key maps to.
Our fused qkv is Llama's q_proj, k_proj and v_proj: its update B A is theirs stacked by rows, so each gets the same A
and its rows of B, and on import each adds to its rows. GPT-2's Conv1D layers store weights [in, out], but PEFT
keeps lora_A [r, in] and lora_B [out, r] for them too (fan_in_fan_out transposes only when merging), so B A is in
our [out, in] orientation for every family.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..chat import CHAT_TEMPLATE_FILE
from ..checkpoint import check_out, latest_checkpoint, load_state, save_checkpoint, save_tensors, staged_dir
from ..config import dump_json
from ..errors import CheckpointError, ConversionError
from ..tokenizers import save_tokenizer
from .hf import EXPORT_METADATA, _qkv_sizes, check_representable, expand_keys, hub_folder, infer_family, is_export

PEFT_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
"""The HF modules PEFT adapts where lora.py adapts a block's linear layers."""


def is_adapter_export(folder: Path) -> bool:
    """Whether `folder` holds an adapter export of ours (EXPORT_METADATA in its adapter_model.safetensors)."""
    return is_export(folder, "adapter_model.safetensors")


def export_adapters(run: str | Path, out: str | Path, family: str | None = None, overwrite: bool = False) -> Path:
    """Write the LoRA adapters of a run fine-tuned with train.lora_rank as a PEFT adapter folder that
    `peft.PeftModel.from_pretrained` puts on the Hugging Face export of the base run (`tlm export BASE`)."""
    from ..api import read_run_config

    run, out = Path(run), Path(out)
    config, c = read_run_config(run)
    train = config.get("train") or {}
    folder = latest_checkpoint(run)
    if not train.get("lora_rank") or folder is None:
        raise ConversionError(f"{run} is not a LoRA fine-tune with a checkpoint (train.lora_rank); export the whole "
                              f"model instead: tlm export {run} --out DIR")
    state = load_state(folder)
    if "lora" not in state:
        raise CheckpointError(f"{folder / 'state.pt'} holds no LoRA adapters: a damaged checkpoint")
    family = family or infer_family(c)
    check_representable(c, family)  # what the base's export needs: the adapters fit it alone
    rows = _qkv_sizes(c)
    tensors = {}
    for hf_key, ours, transform in expand_keys(family, c.n_layer):
        layer = ours.removesuffix(".weight")
        if f"{layer}.lora_a" not in state["lora"] or not hf_key.endswith(".weight"):
            continue
        a, b = state["lora"][f"{layer}.lora_a"], state["lora"][f"{layer}.lora_b"]
        if transform in rows:
            b = b[slice(*rows[transform])]
        module = f"base_model.model.{hf_key.removesuffix('.weight')}"
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = a.clone(), b.clone()  # q, k, v: one A
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": train["lora_rank"],
                      "lora_alpha": train.get("lora_alpha", 16.0), "lora_dropout": train.get("lora_dropout", 0.0),
                      "target_modules": _target_modules(family, c.n_layer, tensors), "bias": "none",
                      "fan_in_fan_out": family == "gpt2", "base_model_name_or_path": str(train.get("init_from")),
                      "inference_mode": True}
    check_out(out, overwrite, [run], ours=is_adapter_export, what="an adapter export")
    with staged_dir(out, overwrite) as tmp:
        save_tensors(tensors, tmp / "adapter_model.safetensors", metadata=EXPORT_METADATA)
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out


def _target_modules(family: str, n_layer: int, tensors: dict[str, torch.Tensor]) -> list[str]:
    """PEFT's target_modules for the adapted modules: their names' last parts (["c_attn", "c_proj", "c_fc"]) where
    every module so named is adapted, else the adapted modules' whole names (GPT-2 names both attention's output
    projection and the MLP's c_proj: train.lora_targets may have adapted one alone)."""
    adapted = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in tensors
               if k.endswith(".lora_A.weight")}
    named = [m for m in PEFT_TARGETS["gpt2" if family == "gpt2" else "llama"]
             if any(a.endswith(f".{m}") for a in adapted)]
    every = {key.removesuffix(".weight") for key, _, _ in expand_keys(family, n_layer)
             if any(key.endswith(f".{m}.weight") for m in named)}
    return named if every <= adapted else sorted(adapted)


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def _adapter_config(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {folder / 'adapter_config.json'} ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise ConversionError(f"{folder} holds a {cfg.get('peft_type')} adapter; tlm merges LoRA adapters only")
    unsupported = [k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform")
                   if cfg.get(k)]
    if unsupported:
        raise ConversionError(f"{folder}'s LoRA adapter uses {', '.join(unsupported)}, which tlm does not merge; "
                              "merge it with peft (PeftModel.merge_and_unload) and convert the merged model")
    return cfg


def import_adapters(src: str | Path, base: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A run folder of the model `base` (a run, e.g. one `tlm convert` imported) with the PEFT LoRA adapter `src` (a
    folder, or a Hub id: hub_folder) merged into its weights: W + (lora_alpha / r) B A (lora_alpha / sqrt(r) with
    use_rslora), computed in float32, stored in the base's dtype. Its tokenizer and chat template are the base's."""
    from ..api import load_run

    src, out = hub_folder(src), Path(out)
    cfg = _adapter_config(src)
    if not (src / "adapter_model.safetensors").is_file():
        raise ConversionError(f"{src} has no adapter_model.safetensors (an adapter_model.bin is a pickle, which tlm "
                              "never loads: save it again with safetensors)")
    try:
        tensors = load_file(str(src / "adapter_model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{src / 'adapter_model.safetensors'} is truncated or corrupt ({e})") from None
    run = load_run(base, "cpu")
    model, c = run.model, run.model.config
    family = infer_family(c)
    places = {hf_key.removesuffix(".weight"): (ours, transform)
              for hf_key, ours, transform in expand_keys(family, c.n_layer) if hf_key.endswith(".weight")}
    rows = _qkv_sizes(c)
    params = dict(model.named_parameters())
    r = cfg.get("r", 8)
    scale = cfg.get("lora_alpha", r) / (math.sqrt(r) if cfg.get("use_rslora") else r)
    merged = 0
    with torch.no_grad():
        for key in sorted(tensors):
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            b_key = key.replace(".lora_A.", ".lora_B.")
            if module not in places or b_key not in tensors:
                raise ConversionError(f"the adapter adapts {module}, which a {family} model of {base}'s config has "
                                      "no linear layer for (or lacks its lora_B): is it an adapter of this model?")
            ours, transform = places[module]
            delta = scale * (tensors[b_key].float() @ tensors[key].float())
            weight = params[ours]
            target = weight[slice(*rows[transform])] if transform in rows else weight
            if target.shape != delta.shape:
                raise ConversionError(f"the adapter's update of {module} has shape {tuple(delta.shape)}, the base's "
                                      f"weight {tuple(target.shape)}: an adapter of another model")
            target.copy_((target.float() + delta).to(target.dtype))
            merged += 1
    if not merged:
        raise ConversionError(f"{src}'s adapter_model.safetensors holds no LoRA weights (lora_A / lora_B)")
    check_out(out, overwrite, [src, base])
    source = {"format": "peft", "adapter": str(src.resolve()), "base": str(Path(base).resolve())}
    with staged_dir(out, overwrite) as tmp:
        (tmp / "config.json").write_text(dump_json({"model": c.to_dict(), "source": source}))
        save_tokenizer(run.tokenizer, tmp / "tokenizer.json")
        if run.chat_template is not None:
            (tmp / CHAT_TEMPLATE_FILE).write_text(run.chat_template, encoding="utf-8")
        save_checkpoint(tmp, model, {"source": source}, 0)
    return out
