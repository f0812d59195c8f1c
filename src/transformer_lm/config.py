"""Typed configuration: one dataclass per concern (model, training, sampling) and presets kept as data.

Configs store component *names* (``"rope"``, ``"rmsnorm"``) rather than objects so that they serialize to JSON/YAML
and back unchanged; the run folder keeps the resolved config beside the weights.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError


def check_types(config: Any, prefix: str) -> None:
    """Raise ConfigError for a field whose value is not of its annotated type: a config.json or preset is text that
    anyone may have edited, and a float layer count or a string width would otherwise fail deep inside PyTorch.
    An int field takes only ints (not bools), a float field any finite real number (NaN passed every `x <= 0`
    check: a NaN max_time never ended a run, a 1e400 lr trained NaN weights), a Literal one of its values; a seed
    what torch.manual_seed takes."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _fits(value, hints[f.name]):
            raise ConfigError(f"{prefix}.{f.name} must be {_describe(hints[f.name])}, got {value!r}")
        if f.name == "seed" and type(value) is int and not -2**63 <= value < 2**64:
            raise ConfigError(f"{prefix}.seed must be in [-2^63, 2^64), got {value}")


def check_unique(name: str, values: list[Any]) -> None:
    """Refuse a list option naming an item twice (an experiment would train or measure it twice)."""
    twice = sorted({str(v) for v in values if values.count(v) > 1})
    if twice:
        raise ConfigError(f"{name} names {', '.join(twice)} more than once; list each once")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if tp is float:
        return type(value) in (int, float) and math.isfinite(value)
    if tp in (int, bool, str, type(None)):
        return type(value) is tp
    return True


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list ({_describe(args[0])} each)"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
            type(None): "null"}.get(tp, str(tp))


Architecture = Literal["transformer", "lstm", "rnn"]
PositionalEncoding = Literal["learned", "sinusoidal", "rope", "none"]
NormKind = Literal["layernorm", "rmsnorm"]
MlpKind = Literal["gelu", "swiglu"]


TRANSFORMER_ONLY = ("n_head", "n_kv_head", "d_ff", "pos_encoding", "rope_theta", "rope_scaling", "rope_scaling_factor",
                    "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_position", "norm", "norm_eps",
                    "mlp", "gelu_approximate", "qkv_bias", "sliding_window")
"""ModelConfig's fields that only a Transformer uses (attention, positions, feed-forward, norms)."""


@dataclass
class ModelConfig:
    """Architecture of a decoder-only Transformer. Defaults are the `tiny` preset's family: a GPT-2-style model."""

    arch: Architecture = "transformer"
    """transformer, or a recurrent baseline behind the same interface (recurrent.py): lstm or rnn (Elman, tanh),
    n_layer layers of width n_embd. Recurrent models use vocab_size, block_size (the training window), n_layer,
    n_embd, bias, tie_embeddings and dropout; the attention, position and feed-forward fields do not apply to them
    (`tlm train` and `tlm info` warn about those set)."""
    vocab_size: int = 256
    """Number of token ids; set from the tokenizer when training."""
    block_size: int = 256
    """Context window: the most tokens the model attends over."""
    n_layer: int = 4
    """Number of residual blocks."""
    n_head: int = 4
    """Number of query heads."""
    n_embd: int = 128
    """Width of the residual stream (d_model)."""
    n_kv_head: int | None = None
    """Key/value heads for grouped-query attention; None means n_head (plain multi-head attention)."""
    d_ff: int | None = None
    """Hidden width of the feed-forward network; None means 4*n_embd (gelu) or 8/3*n_embd rounded up to 64 (swiglu)."""
    pos_encoding: PositionalEncoding = "learned"
    """Positional encoding: learned absolute (GPT-2), sinusoidal (Vaswani et al. 2017), rope (rotary) or none."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    rope_scaling: Literal["llama3"] | None = None
    """Rotary frequency scaling for long contexts: llama3 (Llama 3.1+), or None."""
    rope_scaling_factor: float = 8.0
    """llama3 scaling: how much the long wavelengths are slowed."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths above original/low_freq_factor are scaled fully."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below original/high_freq_factor are kept."""
    rope_original_max_position: int = 8192
    """llama3 scaling: the context length the model was pretrained with."""
    norm: NormKind = "layernorm"
    """Normalization layer of the pre-norm blocks and the final norm."""
    norm_eps: float = 1e-5
    """Epsilon of the normalization layers."""
    mlp: MlpKind = "gelu"
    """Feed-forward network: GELU MLP (GPT-2) or SwiGLU (Llama)."""
    gelu_approximate: Literal["none", "tanh"] = "tanh"
    """GELU variant; GPT-2 uses the tanh approximation ("gelu_new")."""
    bias: bool = True
    """Biases in linear layers and LayerNorm (GPT-2 has them, Llama does not)."""
    qkv_bias: bool | None = None
    """Biases on the Q/K/V projection only (Qwen2); None follows `bias`."""
    sliding_window: int | None = None
    """Each query attends to at most this many most recent keys, itself included (Mistral); None: the whole context."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the LM head."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches during training."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field and how to fix it."""
        check_types(self, "model")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.arch != "transformer":  # the checks below are of attention, positions and feed-forward
            return
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}); "
                "change one of them"
            )
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ConfigError(
                f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head}); "
                "choose n_kv_head among the divisors of n_head"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ConfigError(f"rope needs an even head size, got n_embd/n_head = {self.head_dim}")
        if self.pos_encoding == "rope" and not self.rope_theta > 1:
            raise ConfigError(f"model.rope_theta must be > 1 (10000 in most models), got {self.rope_theta}")
        if not self.norm_eps >= 0:
            raise ConfigError(f"model.norm_eps must be >= 0, got {self.norm_eps}")
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise ConfigError(f"sinusoidal encoding needs an even n_embd, got {self.n_embd}")
        if self.rope_scaling == "llama3" and not (self.rope_scaling_factor > 0 and self.rope_original_max_position > 0
                                                  and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            raise ConfigError("llama3 rope scaling needs factor > 0, original_max_position > 0 and "
                              "0 < low_freq_factor < high_freq_factor")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"model.sliding_window must be >= 1 or null, got {self.sliding_window}")
        if self.d_ff is not None and self.d_ff < 1:
            raise ConfigError(f"model.d_ff must be >= 1, got {self.d_ff}")

    def unused_fields(self) -> dict[str, Any]:
        """The attention, position and feed-forward fields set away from their defaults in a recurrent model's
        config (`arch` lstm or rnn), which it does not use: `tlm train --model.arch lstm --model.n_head 8` trained
        the same LSTM as without the flag, and said nothing. Empty for a Transformer."""
        if self.arch == "transformer":
            return {}
        default = ModelConfig()
        return {name: getattr(self, name) for name in TRANSFORMER_ONLY if getattr(self, name) != getattr(default, name)}

    # Derived fields, computed in one place.
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":
            return -(-(8 * self.n_embd // 3) // 64) * 64
        return 4 * self.n_embd

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        return cls.from_dict({**preset(name), **overrides})

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Load a model config from a JSON or YAML file (a run's config.json has it under the "model" key)."""
        try:
            d = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read model config {path}: {e}") from e
        if isinstance(d, dict) and isinstance(d.get("model"), dict):
            d = d["model"]
        if not isinstance(d, dict):
            raise ConfigError(f"model config {path} must hold a mapping of fields")
        return cls.from_dict(d)


def presets() -> dict[str, dict[str, Any]]:
    """All presets, by name, as the field overrides they apply to ModelConfig's defaults (a recipe preset also holds
    a `train` mapping of TrainConfig overrides)."""
    return yaml.safe_load(resources.files(__package__).joinpath("presets.yaml").read_text())


def _preset_entry(name: str) -> dict[str, Any]:
    table = presets()
    if name not in table:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(table)}")
    return dict(table[name])


def preset(name: str) -> dict[str, Any]:
    """The preset's ModelConfig field overrides."""
    return {k: v for k, v in _preset_entry(name).items() if k != "train"}


def preset_recipe(name: str) -> dict[str, Any]:
    """The TrainConfig overrides a recipe preset ships with (empty for an architecture-only preset)."""
    return dict(_preset_entry(name).get("train") or {})


@dataclass
class TrainConfig:
    """Optimization and bookkeeping of a training run."""

    batch_size: int = 16
    """Sequences per micro-batch (under torchrun: the global micro-batch, split evenly over the ranks). A Transformer
    run whose memory plan (`tlm memory`) for it exceeds the free memory is refused before training starts."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (effective batch = batch_size * grad_accum)."""
    max_iters: int | None = 2000
    """Stop after this many optimizer steps (None: no iteration limit)."""
    max_tokens: int | None = None
    """Stop after this many training tokens, in whole steps: the step that reaches it is the last, so up to one
    step's tokens more are trained (None: no token limit)."""
    max_time: float | None = None
    """Stop after this many seconds of training (the steps' wall-clock time, the first step's compile included;
    evaluations and checkpoints are not counted, as a speedrun's clock does not count them) (None: no time limit)."""
    lr: float = 2e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak, reached at the end of the cosine or wsd decay."""
    warmup_iters: int = 100
    """Linear warmup steps."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Learning-rate decay after warmup: cosine over the rest of the run, wsd (warmup-stable-decay: constant, then a
    linear cooldown over the last cooldown_fraction of the budget after warmup, placed by the measured progress of an
    iteration, token or time budget) or constant."""
    cooldown_fraction: float = 0.2
    """wsd: the fraction of the budget after warmup spent decaying the learning rate to lr*min_lr_ratio."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw, or muon: Muon (orthogonalized momentum) for the hidden 2-D weights and AdamW for embeddings, LM head,
    biases and gains (needs torch >= 2.9; not with parallel fsdp, whose shards are not whole matrices)."""
    muon_lr: float = 0.02
    """Muon's peak learning rate (scaled by the same schedule as lr)."""
    muon_momentum: float = 0.95
    """Muon's Nesterov momentum."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW, and Muon's), applied to matrices only (not to biases, norms or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    eval_interval: int = 500
    """Evaluate and checkpoint every this many steps (and at the end)."""
    eval_batches: int = 20
    """Validation batches per evaluation, of batch_size * grad_accum sequences each (a deterministic pass over the
    start of the val split, the same whichever way the batch is split into micro-batches)."""
    log_interval: int = 10
    """Write a metrics.jsonl line every this many steps (and at step 1 and the last step)."""
    seed: int = 1337
    """Seed for initialization, batch sampling and dropout."""
    init_from: str | None = None
    """Fine-tune: start from the weights of this run folder's latest checkpoint (a `tlm train` run, or a model `tlm
    convert` imported) instead of a random initialization, with a fresh optimizer and schedule. The model config and
    tokenizer are that run's (the data is tokenized with its tokenizer; on the command line its model fields become
    the defaults, so only fields that change no weight, like dropout, may differ); a chat template comes along."""
    lora_rank: int = 0
    """Fine-tune with LoRA adapters of this rank on every linear layer of the blocks (lora.py), the model's own
    weights frozen: gradients and optimizer state for the adapters only. 0: train every weight. Needs init_from."""
    lora_alpha: float = 16.0
    """LoRA's scale numerator: the update is (lora_alpha / lora_rank) B A."""
    lora_dropout: float = 0.0
    """Dropout on the input of LoRA's update."""
    neftune_alpha: float = 0.0
    """NEFTune (Jain et al., 2023): add uniform noise in [-a, a], a = alpha / sqrt(block_size · n_embd), to the token
    embeddings while training (not when evaluating), which the paper found to improve instruction fine-tunes; 5 is
    its usual value. 0: none."""
    lora_targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "up", "gate", "down"])
    """The linear layers of each block LoRA adapts: qkv (attention's fused Q/K/V projection), proj (its output
    projection), up, gate (SwiGLU's) and down (the feed-forward network's); all by default, as PEFT's
    "all-linear"."""
    lora_quantize: str | None = None
    """QLoRA: hold the frozen weights of the blocks quantized, int8 or int4 (groups of 128 inputs; int4:GROUP for
    another size), as `tlm sample --quantize` quantizes them: a quarter or an eighth of their float32 memory. The
    checkpoints hold the dequantized weights merged with the adapters. None: the weights stay float."""
    dpo_beta: float = 0.1
    """Direct preference optimization (preference.py), which a fine-tune on preference pairs ({"prompt", "chosen",
    "rejected"}) trains by: the β of its implicit rewards β (log π - log π_ref), how far the policy may move from
    the model it starts from (smaller: further). 0.1 is the paper's and TRL's default."""
    dpo_loss: Literal["sigmoid", "hinge", "ipo", "robust"] = "sigmoid"
    """The preference loss, named as TRL's DPOTrainer names it (preference.py gives each formula): sigmoid (DPO's),
    hinge (SLiC), ipo (IPO; β is its τ) or robust (DPO corrected for train.dpo_label_smoothing of flipped labels)."""
    dpo_label_smoothing: float = 0.0
    """The robust loss's assumed fraction of pairs whose labels are flipped, in [0, 0.5)."""
    dpo_nll_weight: float = 0.0
    """RPO: add this weight times the chosen completions' negative log-likelihood per token to the preference loss
    (1 in the RPO paper), so the chosen completions keep their likelihood. 0: none."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Autocast precision: auto is bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU/MPS."""
    compile: bool = False
    """Compile the model with torch.compile."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Data parallelism when started by torchrun with WORLD_SIZE > 1: ddp (replicated weights) or fsdp (FSDP2,
    sharded weights, gradients and optimizer state, checkpointed as shards). batch_size is then the global
    micro-batch, split over ranks."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: activation memory falls from
    every block's to the blocks' inputs plus one block's, for about one more forward pass of compute (Transformer
    models only: a recurrent baseline has no blocks to recompute and is refused)."""
    dist_timeout: float = 1800.0
    """Seconds a collective (all-reduce, all-gather, barrier) waits for the other ranks before the run fails with an
    error, e.g. when a rank died or hangs. Keep it above the longest pause of one rank: a checkpoint write."""

    def __post_init__(self) -> None:
        check_types(self, "train")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
        if self.max_iters is None and self.max_tokens is None and self.max_time is None:
            raise ConfigError("the run has no end: set train.max_iters, train.max_tokens or train.max_time")
        if self.lora_rank < 0 or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"train.lora_rank must be >= 0 (0: no LoRA) and train.lora_dropout in [0, 1), got "
                              f"{self.lora_rank} and {self.lora_dropout}")
        if self.lora_rank and not self.init_from:
            raise ConfigError("train.lora_rank adapts a trained model: give the run to fine-tune, --train.init_from "
                              "RUN (or drop lora_rank to train from scratch)")
        if self.dpo_beta <= 0:
            raise ConfigError(f"train.dpo_beta must be > 0, got {self.dpo_beta}; try 0.1")
        if not 0 <= self.dpo_label_smoothing < 0.5:
            raise ConfigError(f"train.dpo_label_smoothing is a fraction of flipped labels in [0, 0.5), got "
                              f"{self.dpo_label_smoothing}; try 0.1")
        if self.dpo_label_smoothing and self.dpo_loss != "robust":
            raise ConfigError("train.dpo_label_smoothing is the robust loss's: set --train.dpo_loss robust, or drop "
                              "it")
        if self.dpo_nll_weight < 0:
            raise ConfigError(f"train.dpo_nll_weight must be >= 0 (0: no NLL term), got {self.dpo_nll_weight}")
        if self.neftune_alpha < 0:
            raise ConfigError(f"train.neftune_alpha must be >= 0 (0: no noise), got {self.neftune_alpha}")
        unknown = sorted(set(self.lora_targets) - {"qkv", "proj", "up", "gate", "down"})
        if unknown or not self.lora_targets:
            raise ConfigError(f"train.lora_targets names the layers LoRA adapts, some of qkv, proj, up, gate, down; "
                              f"got {self.lora_targets}")
        if self.lora_quantize is not None and (not self.lora_rank or not re.fullmatch(r"int8|int4(:\d+)?",
                                                                                     self.lora_quantize)):
            raise ConfigError(f"train.lora_quantize holds LoRA's frozen weights as int8, int4 or int4:GROUP_SIZE "
                              f"(with train.lora_rank > 0), got {self.lora_quantize!r} with lora_rank {self.lora_rank}")
        if self.lora_rank and self.optimizer != "adamw":
            raise ConfigError("LoRA's adapters train with adamw; drop --train.optimizer muon (or lora_rank)")
        for name in ("max_iters", "max_tokens", "max_time"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {v}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("train.lr must be > 0 and train.min_lr_ratio in [0, 1]")
        if not 0 < self.cooldown_fraction <= 1 or self.muon_lr <= 0:
            raise ConfigError("train.cooldown_fraction must be in (0, 1] and train.muon_lr > 0")
        if self.eval_interval < 1 or self.eval_batches < 1 or self.log_interval < 1:
            raise ConfigError("train.eval_interval, train.eval_batches and train.log_interval must be >= 1")
        if not 0 < self.dist_timeout <= 1e9:  # a timedelta holds ~8.6e13 s; 1e9 s is 31 years
            raise ConfigError(f"train.dist_timeout must be in (0, 1e9] seconds, got {self.dist_timeout}")
        for name in ("warmup_iters", "weight_decay", "grad_clip"):  # a negative clip norm would flip the gradient
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2", "muon_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class SampleConfig:
    """How tokens are drawn from the model's next-token distribution."""

    max_new_tokens: int = 200
    """Most tokens to generate per sample (it ends sooner at one of the tokenizer's end-of-sequence ids)."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy."""
    top_k: int | None = None
    """Keep only the k most likely tokens (None: all)."""
    top_p: float | None = None
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches p (None: off)."""
    greedy: bool = False
    """Always pick the most likely token (same as temperature 0)."""
    seed: int | None = None
    """Random seed for reproducible samples (None: nondeterministic)."""
    stop: list[str] = field(default_factory=list)
    """Stop a sample when it produces any of these strings (the stop string is not included)."""
    num_samples: int = 1
    """Number of independent samples."""
    compile: bool = False
    """torch.compile the single-token decode step (tens of seconds once per process; falls back to eager decoding
    with a warning if compiling fails). A Transformer's plain decoding only: a recurrent model and speculative
    decoding with a draft decode eagerly, with one warning."""

    def __post_init__(self) -> None:
        check_types(self, "sample")
        if "" in self.stop:
            raise ConfigError("sample.stop holds an empty string, which every text contains; drop it")
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {self.num_samples}")
        check_sampling(self.temperature, self.top_k, self.top_p)

    @property
    def draw_temperature(self) -> float:
        """The temperature tokens are drawn at: 0 (greedy) with `greedy`, whatever `temperature` says."""
        return 0.0 if self.greedy else self.temperature


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ConfigError for sampling settings that have no meaning, checked by SampleConfig and by the generation
    functions that take them directly: a negative temperature draws the least likely tokens, and top_k 0, top_p 0 or
    a NaN temperature fail in torch or draw id 0 every time."""
    if not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


def dump_json(obj: Any) -> str:
    """JSON of a config (dataclass or dict), stable and readable."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return json.dumps(obj, indent=2, sort_keys=True)
