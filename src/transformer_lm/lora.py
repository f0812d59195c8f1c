"""LoRA (Hu et al., 2021, "Low-Rank Adaptation of Large Language Models"): fine-tune a model through a low-rank
update of each linear layer of its blocks, W x + (alpha / r) B A x, with W frozen, A (r × in) drawn as nn.Linear
draws its weights and B (out × r) zero, so that training starts from the model itself. Only A and B are trained:
gradients and optimizer state shrink from the model's size to the adapters' (a few MB at rank 8 for a 0.5B model),
which is what lets a large model be fine-tuned where its full training state would not fit.

A module swap of a finished model, as quantize.py's are: `add_lora` wraps the blocks' nn.Linear layers, the model's
own code is untouched; under autocast the frozen weights are held in its precision (`hold_base_in`). A checkpoint
stores the merged weights W + (alpha / r) B A in float32 (every reader of a run folder loads them as any other
model's) and, in its training state, the adapters, which a resumed run puts back on its base model's weights
(train.init_from) to continue exactly.

QLoRA (Dettmers et al., 2023): the frozen weights may be held quantized instead (`quantize_base`: quantize.py's
int8, or int4 in groups), a quarter or an eighth of their float32 size, the adapters staying float32. Their product
is taken through `_FrozenQuantized`, which recomputes the float weight for the backward pass rather than having
autograd keep every layer's until then. The merged weights a checkpoint stores are then the dequantized base plus
the update: the model the adapters were trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import CheckpointError
from .quantize import Int4Linear, Int8Linear, parse_quantize, quantize

TARGETS = ("qkv", "proj", "up", "gate", "down")
"""The linear layers LoRA adapts: all of a block's (attention's Q/K/V and output projections, the feed-forward
network's), as PEFT's "all-linear" does; not the embeddings or the LM head."""


class _FrozenQuantized(torch.autograd.Function):
    """x Wᵀ + b of a quantized layer whose weights are not trained. Autograd would keep the float weight the layer
    widens or dequantizes for its product until the backward pass (x's gradient needs it): the whole model in
    float again, layer by layer. This backward dequantizes the weight anew instead, so only its bits are held, and
    takes its product in the forward's autocast precision (bf16 on a GPU's tensor cores, as the forward's)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor,
                layer: Int8Linear | Int4Linear) -> torch.Tensor:
        dev = x.device.type
        ctx.layer, ctx.x_dtype = layer, x.dtype
        ctx.compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        return layer(x)  # (a Function's forward records no graph: nothing of the product is saved)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        w = ctx.layer.dequantize().to(ctx.compute)
        return (grad.to(ctx.compute) @ w).to(ctx.x_dtype), None


class LoRALinear(nn.Module):
    """A frozen nn.Linear (or a quantized one: QLoRA) plus a trained low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear | Int8Linear | Int4Linear, rank: int, alpha: float,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init, as the paper's code does
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        """False: the base layer alone (adapters_off)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base(x) if isinstance(self.base, nn.Linear) else _FrozenQuantized.apply(x, self.base)
        if not self.enabled:
            return base
        update = F.linear(F.linear(self.dropout(x), self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return base + update * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A, in float32 (the update is small beside W: in bfloat16 much of it would round away);
        of a quantized base, its weight dequantized."""
        w = self.base.weight if isinstance(self.base, nn.Linear) else self.base.dequantize()
        return w.float() + self.scale * (self.lora_b.float() @ self.lora_a.float())


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: Sequence[str] = TARGETS) -> int:
    """Freeze every parameter of `model` and wrap the `targets` linear layers of its blocks (of TARGETS; float, or
    quantized by quantize_base) in LoRALinear, in place (A drawn from torch's global generator: seed it first).
    Returns the number of trained parameters."""
    model.requires_grad_(False)
    swaps = [(parent, name, child) for parent in model.blocks.modules() for name, child in parent.named_children()
             if name in targets and type(child) in (nn.Linear, Int8Linear, Int4Linear)]
    for parent, name, child in swaps:
        setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """`model` without its adapters while in the block: the model they were put on (DPO's reference, which a LoRA
    fine-tune thus holds no second copy of)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def quantize_base(model: nn.Module, bits: int, group_size: int = 128) -> None:
    """Quantize the linear layers of `model`'s blocks in place (quantize.py: int8, or int4 in groups of
    `group_size` inputs), before add_lora wraps them: QLoRA's frozen base. The embeddings and LM head stay float."""
    quantize(model, bits, group_size, head=False)


def base_bytes(config: ModelConfig, quantized: str | None, amp_dtype: torch.dtype) -> float | None:
    """Bytes per weight a LoRA fine-tune holds the frozen weights of the blocks in (plan_memory's base_bytes):
    quantized (train.lora_quantize), in the autocast precision (hold_base_in), or None: float32."""
    from .experiments.memory import quantized_bytes

    if quantized is not None:
        spec = parse_quantize(quantized)
        return quantized_bytes(config, int(spec["bits"]), int(spec["group_size"]))
    return None if amp_dtype == torch.float32 else torch.finfo(amp_dtype).bits / 8


def hold_base_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep the frozen weights of the adapted layers in `dtype`, the autocast precision (bfloat16, float16), in
    place: a weight that is never updated needs no float32 master copy, and autocast then has no copy of it to
    make, so the bulk of a LoRA fine-tune's memory halves again (QLoRA's recipes hold the base so, or lower).
    The adapters, the embeddings, norms and LM head stay float32."""
    for module in model.modules():
        if isinstance(module, LoRALinear) and isinstance(module.base, nn.Linear):
            module.base.to(dtype)


def adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained A and B matrices by parameter name, on the CPU (what a checkpoint's training state holds)."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in
            ("lora_a", "lora_b")}


def load_adapters(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put saved adapters back (in place), checking that they are this model's: the same layers, the same rank."""
    ours = {name: p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
    if set(tensors) != set(ours) or any(tensors[k].shape != p.shape for k, p in ours.items()):
        saved = next((v.shape[0] for k, v in tensors.items() if k.endswith("lora_a")), None)
        raise CheckpointError(f"the checkpoint's LoRA adapters (rank {saved}, {len(tensors)} tensors) do not fit "
                              "this run's; resume with the lora_rank it was trained with")
    with torch.no_grad():
        for name, p in ours.items():
            p.copy_(tensors[name])


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with each LoRALinear as the plain nn.Linear of its merged weight: the state dict of the
    model without adapters, which build_model's model loads."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            bias = state.pop(f"{name}.base.bias", None)
            for key in [k for k in state if k.startswith(f"{name}.")]:  # the adapters, the base's weight (or levels)
                del state[key]
            state[f"{name}.weight"] = module.merged_weight().detach()
            if bias is not None:  # float32 as the merged weight, held in half or not
                state[f"{name}.bias"] = bias.float()
    return state


def lora_params(config: ModelConfig, rank: int, targets: Sequence[str] = TARGETS) -> int:
    """Parameters of the adapters add_lora puts on a model of `config`: r × (in + out) per adapted layer."""
    qkv_out = (config.n_head + 2 * config.kv_heads) * config.head_dim
    shapes = {"qkv": (config.n_embd, qkv_out), "proj": (config.n_embd, config.n_embd),
              "up": (config.n_embd, config.ffn_dim), "down": (config.ffn_dim, config.n_embd),
              "gate": (config.n_embd, config.ffn_dim) if config.mlp == "swiglu" else (0, 0)}
    return config.n_layer * rank * sum(i + o for name, (i, o) in shapes.items() if name in targets)
