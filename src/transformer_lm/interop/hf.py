"""Hugging Face transformers interop: import a model folder of model_type gpt2, llama, mistral or qwen2 into a run
folder, and export a run to a folder that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
load.

Everything family-specific is data: one key map per family (HF parameter name → our name and the transform it needs)
with the export map derived from it by inversion; one config-field map per family; and per family the architecture it
fixes (positional encoding, norm, MLP, biases …), which is what import sets and what export checks. The tensor
transforms are written once: GPT-2's Conv1D transpose, and Q/K/V fused on import / split on export. Llama's HF q/k
rows are already in the rotate-half RoPE layout that model.apply_rope uses, so no permutation is needed here.

Loading is memory-frugal: safetensors shards are opened with `safe_open` (memory-mapped, one tensor read at a time),
the model is built on the meta device and its parameters are the loaded tensors (`assign=True`), and bf16/fp16
weights keep their dtype unless a dtype is asked for.

Tokenizers and the folder's other small files: hf_files.py.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..chat import CHAT_TEMPLATE_FILE, check_template, hf_chat_template
from ..checkpoint import check_out, is_run_folder, save_checkpoint, save_tensors, staged_dir
from ..config import ModelConfig, dump_json
from ..errors import ChatError, CheckpointError, ConversionError, TLMError
from ..model import Transformer
from ..tokenizers import Tokenizer, save_tokenizer
from .hf_files import load_hf_tokenizer, model_config, read_json, special_ids, write_tokenizer

log = logging.getLogger(__name__)

FAMILIES = ("gpt2", "llama", "mistral", "qwen2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ----------------------------------------------------------------------------------------------------------------------
# The declarative part. Key maps: HF key ({i} = layer) → (our key, transform). Transforms: "" copy; "T" GPT-2's Conv1D,
# stored [in, out] (transposed to nn.Linear's [out, in]); "q"/"k"/"v" a row block of our fused attn.qkv (Q, K, V order).

_GPT2_KEYS: dict[str, tuple[str, str]] = {
    "transformer.wte.weight": ("tok_emb.weight", ""),
    "transformer.wpe.weight": ("pos_emb.weight", ""),
    "transformer.h.{i}.ln_1.weight": ("blocks.{i}.norm1.weight", ""),
    "transformer.h.{i}.ln_1.bias": ("blocks.{i}.norm1.bias", ""),
    "transformer.h.{i}.attn.c_attn.weight": ("blocks.{i}.attn.qkv.weight", "T"),
    "transformer.h.{i}.attn.c_attn.bias": ("blocks.{i}.attn.qkv.bias", ""),
    "transformer.h.{i}.attn.c_proj.weight": ("blocks.{i}.attn.proj.weight", "T"),
    "transformer.h.{i}.attn.c_proj.bias": ("blocks.{i}.attn.proj.bias", ""),
    "transformer.h.{i}.ln_2.weight": ("blocks.{i}.norm2.weight", ""),
    "transformer.h.{i}.ln_2.bias": ("blocks.{i}.norm2.bias", ""),
    "transformer.h.{i}.mlp.c_fc.weight": ("blocks.{i}.ffn.up.weight", "T"),
    "transformer.h.{i}.mlp.c_fc.bias": ("blocks.{i}.ffn.up.bias", ""),
    "transformer.h.{i}.mlp.c_proj.weight": ("blocks.{i}.ffn.down.weight", "T"),
    "transformer.h.{i}.mlp.c_proj.bias": ("blocks.{i}.ffn.down.bias", ""),
    "transformer.ln_f.weight": ("norm.weight", ""),
    "transformer.ln_f.bias": ("norm.bias", ""),
    "lm_head.weight": ("lm_head.weight", ""),
}

_LLAMA_KEYS: dict[str, tuple[str, str]] = {
    "model.embed_tokens.weight": ("tok_emb.weight", ""),
    "model.layers.{i}.input_layernorm.weight": ("blocks.{i}.norm1.weight", ""),
    **{f"model.layers.{{i}}.self_attn.{p}_proj.{w}": (f"blocks.{{i}}.attn.qkv.{w}", p)
       for w in ("weight", "bias") for p in "qkv"},
    "model.layers.{i}.self_attn.o_proj.weight": ("blocks.{i}.attn.proj.weight", ""),
    "model.layers.{i}.self_attn.o_proj.bias": ("blocks.{i}.attn.proj.bias", ""),
    "model.layers.{i}.post_attention_layernorm.weight": ("blocks.{i}.norm2.weight", ""),
    **{f"model.layers.{{i}}.mlp.{hf}_proj.{w}": (f"blocks.{{i}}.ffn.{ours}.{w}", "")
       for w in ("weight", "bias") for hf, ours in (("gate", "gate"), ("up", "up"), ("down", "down"))},
    "model.norm.weight": ("norm.weight", ""),
    "lm_head.weight": ("lm_head.weight", ""),
}

KEY_MAPS: dict[str, dict[str, tuple[str, str]]] = {
    "gpt2": _GPT2_KEYS, "llama": _LLAMA_KEYS, "mistral": _LLAMA_KEYS, "qwen2": _LLAMA_KEYS}

# Buffers some HF checkpoints carry that are not parameters (GPT-2's causal masks, old rotary tables).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")

# Config fields: our field → HF field.
_GPT2_FIELDS = {"vocab_size": "vocab_size", "block_size": "n_positions", "n_layer": "n_layer", "n_head": "n_head",
                "n_embd": "n_embd", "d_ff": "n_inner", "norm_eps": "layer_norm_epsilon",
                "tie_embeddings": "tie_word_embeddings"}
_LLAMA_FIELDS = {"vocab_size": "vocab_size", "block_size": "max_position_embeddings", "n_layer": "num_hidden_layers",
                 "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads", "n_embd": "hidden_size",
                 "d_ff": "intermediate_size", "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings"}
CONFIG_FIELDS = {"gpt2": _GPT2_FIELDS, "llama": _LLAMA_FIELDS, "mistral": _LLAMA_FIELDS, "qwen2": _LLAMA_FIELDS}

# transformers' defaults (GPT2Config, LlamaConfig, MistralConfig, Qwen2Config) for the fields read on import: a
# config.json without one means that value to transformers, which may not be ours (rms_norm_eps 1e-6, not 1e-5;
# Mistral's 4096-token window, not none). Llama's and Qwen2's num_key_value_heads default to the head count, as ours.
_LLAMA_LIKE = {"vocab_size": 32000, "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_size": 4096,
                "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768,
             "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True},
    "llama": {**_LLAMA_LIKE, "max_position_embeddings": 2048, "intermediate_size": 11008},
    "mistral": {**_LLAMA_LIKE, "max_position_embeddings": 131072, "intermediate_size": 14336,
                "num_key_value_heads": 8, "sliding_window": 4096},
    "qwen2": {**_LLAMA_LIKE, "vocab_size": 151936, "max_position_embeddings": 32768, "intermediate_size": 22016},
}

# The architecture each family fixes: set on import, required on export. `qkv_bias` is compared as resolved
# (ModelConfig.has_qkv_bias). Llama leaves `bias` free (attention_bias = mlp_bias = bias, Q/K/V included); the rope
# families all take llama3 rope scaling (transformers reads rope_parameters alike for each); Mistral alone has a
# sliding window.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gpt2": {"pos_encoding": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "qkv_bias": True,
             "sliding_window": None},
    "llama": {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "sliding_window": None},
    "mistral": {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "qkv_bias": False},
    "qwen2": {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "qkv_bias": True,
              "sliding_window": None},
}
_HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM"}
_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def expand_keys(family: str, n_layer: int) -> Iterator[tuple[str, str, str]]:
    """(HF key, our key, transform) for every parameter a model of `family` with `n_layer` blocks can have."""
    for hf_key, (ours, transform) in KEY_MAPS[family].items():
        layers = range(n_layer) if "{i}" in hf_key else [None]
        for i in layers:
            yield hf_key.format(i=i), ours.format(i=i), transform


def _qkv_sizes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """Row range of Q, K and V inside our fused qkv projection."""
    q, kv = c.n_head * c.head_dim, c.kv_heads * c.head_dim
    return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}


# ----------------------------------------------------------------------------------------------------------------------
# Config mapping


def _rope_settings(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE fields from transformers 5's `rope_parameters` or 4.x's top-level `rope_theta` / `rope_scaling`."""
    try:
        return _read_rope(hf)
    except (KeyError, TypeError, ValueError) as e:
        given = {k: hf[k] for k in ("rope_theta", "rope_scaling", "rope_parameters") if k in hf}
        what = f"lacks {e}" if isinstance(e, KeyError) else f"is malformed ({e})"
        raise ConversionError(f"the rope settings of config.json {what}: {given}") from None


def _read_rope(hf: dict[str, Any]) -> dict[str, Any]:
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "llama3":
        out.update(rope_scaling="llama3", rope_scaling_factor=float(params["factor"]),
                   rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_position=int(params["original_max_position_embeddings"]))
    elif kind != "default":
        raise ConversionError(f"rope scaling type {kind!r} is not supported (supported: default, llama3)")
    return out


def config_from_hf(hf: dict[str, Any]) -> tuple[ModelConfig, str]:
    """Our ModelConfig and the family, from a Hugging Face config.json's contents."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ConversionError(f"unsupported model_type {family!r}; tlm converts {', '.join(FAMILIES)}")
    hf = {**HF_DEFAULTS[family], **hf}
    fields = {ours: hf[theirs] for ours, theirs in CONFIG_FIELDS[family].items() if hf.get(theirs) is not None}
    arch = dict(ARCHITECTURES[family])
    if family == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in _GELU:
            raise ConversionError(f"GPT-2 activation_function {act!r} is not supported (supported: {', '.join(_GELU)})")
        arch["gelu_approximate"] = _GELU[act]
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise ConversionError(f"GPT-2 option {flag}=true is not supported")
        if hf.get("scale_attn_weights") is False:
            raise ConversionError("GPT-2 option scale_attn_weights=false is not supported")
    else:
        if hf.get("hidden_act", "silu") != "silu":
            raise ConversionError(f"hidden_act {hf['hidden_act']!r} is not supported (the SwiGLU MLP needs silu)")
        arch.update(_rope_settings(hf))
        if family == "llama":
            if bool(hf.get("attention_bias")) != bool(hf.get("mlp_bias")):
                raise ConversionError("llama with attention_bias != mlp_bias is not supported")
            arch["bias"] = arch["qkv_bias"] = bool(hf.get("attention_bias"))
        elif family == "mistral":
            arch["sliding_window"] = hf.get("sliding_window")
        elif hf.get("use_sliding_window"):
            raise ConversionError("qwen2 with use_sliding_window=true is not supported")
    try:
        config = ModelConfig(**fields, **arch)
    except TLMError as e:
        raise ConversionError(f"the {family} config does not fit tlm's model: {e}") from None
    head_dim = hf.get("head_dim")
    if family != "gpt2" and head_dim is not None and head_dim != config.head_dim:
        raise ConversionError(f"head_dim {head_dim!r} != hidden_size / num_attention_heads ({config.head_dim}) is not "
                              "supported")
    return config, family


def infer_family(c: ModelConfig) -> str:
    """The family whose architecture is closest to `c`; export_hf then checks it really fits."""
    if c.pos_encoding != "rope":
        return "gpt2"
    if c.sliding_window is not None:
        return "mistral"
    return "qwen2" if c.has_qkv_bias and not c.bias else "llama"


def check_representable(c: ModelConfig, family: str) -> None:
    """Raise ConversionError naming the first feature of `c` that `family` cannot represent."""
    if family not in FAMILIES:
        raise ConversionError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if c.arch != "transformer":
        raise ConversionError(f"cannot export an {c.arch} model to Hugging Face: its families are Transformers "
                              "(model.arch=transformer)")
    reason = _mismatch(c, family)
    if reason is not None:  # where the whole model can go instead (one field's takers may refuse another field)
        takers = [f for f in FAMILIES if _mismatch(c, f) is None]
        raise ConversionError(f"cannot export to Hugging Face {family}: {reason}" + (
            f" (exportable as {', '.join(takers)})" if takers else " (no Hugging Face family has this combination)"))


def _mismatch(c: ModelConfig, family: str) -> str | None:
    """The first feature of `c` that `family` cannot represent, or None."""
    have = {**c.to_dict(), "qkv_bias": c.has_qkv_bias}
    needs = dict(ARCHITECTURES[family])
    if family == "llama":
        needs["qkv_bias"] = c.bias
    for name, need in needs.items():
        if have[name] != need:
            return f"model.{name} is {have[name]!r}, {family} needs {need!r}"
    if family == "gpt2" and c.kv_heads != c.n_head:
        return f"grouped-query attention (n_kv_head={c.n_kv_head})"
    return None


def config_to_hf(c: ModelConfig, family: str, tokenizer: Tokenizer | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A config.json for `family` describing `c` (checked with check_representable first)."""
    check_representable(c, family)
    hf: dict[str, Any] = {"model_type": family, "architectures": [_HF_CLASSES[family]],
                          "dtype": str(dtype).removeprefix("torch.")}
    hf.update({theirs: getattr(c, ours) for ours, theirs in CONFIG_FIELDS[family].items()})
    hf.update(special_ids(tokenizer))
    if family == "gpt2":
        hf.update(n_ctx=c.block_size, activation_function="gelu_new" if c.gelu_approximate == "tanh" else "gelu",
                  resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout)
        return hf
    hf.update(num_key_value_heads=c.kv_heads, intermediate_size=c.ffn_dim, head_dim=c.head_dim, hidden_act="silu",
              attention_dropout=c.dropout)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=c.rope_scaling_factor, low_freq_factor=c.rope_low_freq_factor,
                    high_freq_factor=c.rope_high_freq_factor,
                    original_max_position_embeddings=c.rope_original_max_position)
    # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta / rope_scaling.
    hf.update(rope_parameters=rope, rope_theta=c.rope_theta,
              rope_scaling=rope if c.rope_scaling is not None else None)
    if family == "llama":
        hf.update(attention_bias=c.bias, mlp_bias=c.bias)
    elif family == "mistral":
        hf["sliding_window"] = c.sliding_window
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf


# ----------------------------------------------------------------------------------------------------------------------
# Weights


class _Weights:
    """The tensors of a HF folder, read lazily from memory-mapped safetensors (one file or an indexed set of shards)."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index, "shard index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"shard index {index} has no weight_map")
            files = {k: folder / v for k, v in weight_map.items()}
        elif (folder / "model.safetensors").exists():
            files = None
        else:
            raise CheckpointError(f"{folder} has no model.safetensors or model.safetensors.index.json "
                                  "(only safetensors weights are imported; convert .bin files with transformers first)")
        self._handles: dict[Path, Any] = {}
        if files is None:
            files = {k: folder / "model.safetensors" for k in self._open(folder / "model.safetensors").keys()}
        for shard in sorted(set(files.values())):
            if not shard.exists():
                raise CheckpointError(f"missing shard {shard.name} named by {index.name} in {folder}")
            keys = set(self._open(shard).keys())
            listed = sorted(k for k, f in files.items() if f == shard and k not in keys)
            if listed:
                raise CheckpointError(f"shard {shard.name} does not match {index.name}: it lacks {listed[:3]}")
        self.files = {k: (f, k) for k, f in files.items()}  # name → (file, the name it is stored under)

    def rename(self, name: Callable[[str], str]) -> None:
        """Look the tensors up under other names (`name` of each stored one)."""
        self.files = {name(k): where for k, where in self.files.items()}

    def _open(self, path: Path) -> Any:
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"weights file {path} is truncated or corrupt ({e})") from None
        return self._handles[path]

    def keys(self) -> set[str]:
        return set(self.files)

    def get(self, key: str) -> torch.Tensor:
        path, stored = self.files[key]
        return self._open(path).get_tensor(stored)


def load_hf(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[Transformer, str]:
    """Our Transformer (in eval mode, on CPU) and the family, from a Hugging Face model folder."""
    folder = Path(folder)
    hf_config = model_config(folder)
    config, family = config_from_hf(hf_config)
    weights = _Weights(folder)
    available = weights.keys()
    if family == "gpt2" and not any(k.startswith("transformer.") for k in available):
        # OpenAI's original upload has no "transformer." prefix
        weights.rename(lambda k: k if k == "lm_head.weight" else "transformer." + k)
        available = weights.keys()
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        del expected["lm_head.weight"]
    parts: dict[str, dict[str, str]] = {}  # our key → {transform: HF key}
    for hf_key, ours, transform in expand_keys(family, config.n_layer):
        if ours in expected:
            parts.setdefault(ours, {})[transform] = hf_key
    used: set[str] = set()
    state: dict[str, torch.Tensor] = {}
    for ours, sources in parts.items():
        missing = sorted(k for k in sources.values() if k not in available)
        if missing:
            raise CheckpointError(f"weights in {folder} lack {missing[:3]}, which config.json implies")
        used.update(sources.values())
        if "q" in sources:  # fuse Q, K, V into our single projection
            tensor = torch.cat([weights.get(sources[p]) for p in "qkv"], dim=0)
        else:
            ((transform, hf_key),) = sources.items()
            tensor = weights.get(hf_key)
            tensor = tensor.t().contiguous() if transform == "T" else tensor
        if tensor.shape != expected[ours]:
            raise CheckpointError(f"weights in {folder} do not fit its config.json: {ours} has shape "
                                  f"{tuple(tensor.shape)}, the config needs {tuple(expected[ours])}")
        state[ours] = tensor.to(dtype) if dtype is not None else tensor
    unused = sorted(k for k in available - used if not k.endswith(_IGNORED_SUFFIXES)
                    and not (k == "lm_head.weight" and config.tie_embeddings))
    if unused:
        raise CheckpointError(f"weights in {folder} hold tensors its config.json does not use: {unused[:3]}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.eval(), family


def hf_state_dict(model: Transformer, family: str) -> dict[str, torch.Tensor]:
    """Our weights under `family`'s HF names and layouts (the inverse of load_hf's mapping); a tied head is left out,
    as transformers ties it on load."""
    c = model.config
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    if c.tie_embeddings:
        del ours["lm_head.weight"]
    rows = _qkv_sizes(c)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for hf_key, key, transform in expand_keys(family, c.n_layer):
        if key not in ours:
            continue
        used.add(key)
        tensor = ours[key]
        if transform == "T":
            tensor = tensor.t().contiguous()
        elif transform in rows:  # a copy: safetensors refuses tensors that share storage
            a, b = rows[transform]
            tensor = tensor[a:b].clone()
        out[hf_key] = tensor
    leftover = sorted(set(ours) - used)
    if leftover:
        raise ConversionError(f"cannot export to Hugging Face {family}: no place for {leftover[:3]}")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The two verbs

EXPORT_METADATA = {"format": "pt", "exported_by": "transformer-lm"}
"""The safetensors header of an export: transformers reads "format"; "exported_by" tells `export --overwrite` a
folder it may replace from a Hugging Face model's (config.json and model.safetensors, but not ours to delete)."""


def is_export(folder: Path, weights: str = "model.safetensors") -> bool:
    """Whether `folder` holds an export of ours (EXPORT_METADATA in the header of its `weights` file)."""
    try:
        with safe_open(folder / weights, "pt") as f:
            return (f.metadata() or {}).get("exported_by") == EXPORT_METADATA["exported_by"]
    except (OSError, SafetensorError):
        return False


HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
"""What import reads of a Hub repository: configs, weights (shards and index), tokenizer, chat template; not the
PyTorch .bin, ONNX or GGUF copies many repositories also hold."""


def hub_folder(src: str | Path) -> Path:
    """`src` itself when it is a path here; else, when it looks like a Hub model id ("Qwen/Qwen2.5-0.5B-Instruct"),
    the local folder of that repository's files, downloaded (HUB_FILES only) into the Hugging Face cache by
    huggingface_hub, which reuses what it already has and reads HF_TOKEN for gated models."""
    path = Path(src)
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(src)):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConversionError(f"{src} is not a folder here; to download it from the Hugging Face Hub, pip install "
                              "huggingface_hub (or the project's extra: pip install -e '.[hub]')") from None
    log.info("%s is not a folder here: downloading it from the Hugging Face Hub", src)
    try:
        return Path(snapshot_download(str(src), allow_patterns=HUB_FILES))
    except Exception as e:  # offline, no such repository, gated: huggingface_hub's own message says which
        why = " ".join(str(e).split())[:300]
        raise ConversionError(f"{src} is not a folder here, and downloading it from the Hugging Face Hub failed "
                              f"({type(e).__name__}: {why}); give a local folder or a model id that exists") from None


def import_hf(src: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Convert a Hugging Face model folder (or a Hub model id: hub_folder) into a run folder (config.json,
    tokenizer.json, checkpoints/) that load_run, `tlm sample` and `tlm eval` read. `dtype` (float32, bfloat16,
    float16) casts the weights; by default they keep the dtype they are stored in."""
    src, out = hub_folder(src), Path(out)
    if is_run_folder(src):
        raise ConversionError(f"{src} is a tlm run folder, not a Hugging Face one: sample or evaluate it as it is, or "
                              "`tlm export` it")
    tokenizer = load_hf_tokenizer(src)
    template = _chat_template(src)
    model, family = load_hf(src, _dtype(dtype))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                              f"{model.config.vocab_size} embeddings; the folder mixes two models")
    check_out(out, overwrite, [src])
    source = {"format": "huggingface", "model_type": family, "path": str(src.resolve())}
    with staged_dir(out, overwrite) as tmp:
        (tmp / "config.json").write_text(dump_json({"model": model.config.to_dict(), "source": source}))
        save_tokenizer(tokenizer, tmp / "tokenizer.json")
        if template is not None:
            (tmp / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
        save_checkpoint(tmp, model, {"source": source}, 0)
    return out


def _chat_template(src: Path) -> str | None:
    """The folder's chat template (chat.hf_chat_template), or None, with a warning, for one that does not compile:
    the model imports, as a base model."""
    template = hf_chat_template(src)
    try:
        return None if template is None else check_template(template)
    except ChatError as e:
        log.warning("%s; imported without it (a base model: tlm serve --chat_template FILE gives it one)", e)
        return None


def export_hf(run: str | Path, out: str | Path, family: str | None = None, dtype: str | None = None,
              overwrite: bool = False) -> Path:
    """Write a run's latest checkpoint as a Hugging Face folder (config.json, model.safetensors and, when the
    tokenizer has a HF form, tokenizer.json + tokenizer_config.json). `family` defaults to the one whose architecture
    matches (gpt2, llama, mistral or qwen2); a feature no family represents raises ConversionError naming it. When
    the tokenizer has end-of-sequence or BOS ids, a generation_config.json (which transformers' generate reads
    before config.json) names them as config.json does: every id that ends a sample (its stop_ids)."""
    from ..api import load_run  # the API layer sits above checkpoint/model; imported here to keep this module light

    loaded = load_run(run, "cpu")
    config = loaded.model.config
    family = family or infer_family(config)
    torch_dtype = _dtype(dtype) or loaded.model.tok_emb.weight.dtype
    hf_config = config_to_hf(config, family, loaded.tokenizer, torch_dtype)  # raises before anything is written
    tensors = {k: v.to(torch_dtype) for k, v in hf_state_dict(loaded.model, family).items()}
    out = Path(out)
    check_out(out, overwrite, [run], ours=is_export, what="an export")
    with staged_dir(out, overwrite) as tmp:
        save_tensors(tensors, tmp / "model.safetensors", metadata=EXPORT_METADATA)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        special = special_ids(loaded.tokenizer)
        if any(v is not None for v in special.values()):
            (tmp / "generation_config.json").write_text(json.dumps(special, indent=2))
        write_tokenizer(loaded.tokenizer, tmp, config.block_size, family, loaded.chat_template)
    return out


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConversionError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]
