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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import CheckpointError

TARGETS = ("qkv", "proj", "up", "gate", "down")
"""The linear layers LoRA adapts: all of a block's (attention's Q/K/V and output projections, the feed-forward
network's), as PEFT's "all-linear" does; not the embeddings or the LM head."""


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trained low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init, as the paper's code does
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return self.base(x) + update * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A, in float32 (the update is small beside W: in bfloat16 much of it would round away)."""
        return self.base.weight.float() + self.scale * (self.lora_b.float() @ self.lora_a.float())


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> int:
    """Freeze every parameter of `model` and wrap the TARGETS linear layers of its blocks in LoRALinear, in place
    (A drawn from torch's global generator: seed it first). Returns the number of trained parameters."""
    model.requires_grad_(False)
    swaps = [(parent, name, child) for parent in model.blocks.modules() for name, child in parent.named_children()
             if name in TARGETS and type(child) is nn.Linear]
    for parent, name, child in swaps:
        setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def hold_base_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep the frozen weights of the adapted layers in `dtype`, the autocast precision (bfloat16, float16), in
    place: a weight that is never updated needs no float32 master copy, and autocast then has no copy of it to
    make, so the bulk of a LoRA fine-tune's memory halves again (QLoRA's recipes hold the base so, or lower).
    The adapters, the embeddings, norms and LM head stay float32."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
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
            state.pop(f"{name}.lora_a")
            state.pop(f"{name}.lora_b")
            state.pop(f"{name}.base.weight")
            state[f"{name}.weight"] = module.merged_weight().detach()
            if module.base.bias is not None:  # float32 as the merged weight, held in half or not
                state[f"{name}.bias"] = state.pop(f"{name}.base.bias").float()
    return state


def lora_params(config: ModelConfig, rank: int) -> int:
    """Parameters of the adapters add_lora puts on a model of `config`: r × (in + out) per adapted layer."""
    qkv_out = (config.n_head + 2 * config.kv_heads) * config.head_dim
    shapes = [(config.n_embd, qkv_out), (config.n_embd, config.n_embd), (config.n_embd, config.ffn_dim),
              (config.ffn_dim, config.n_embd)] + ([(config.n_embd, config.ffn_dim)] if config.mlp == "swiglu" else [])
    return config.n_layer * rank * sum(i + o for i, o in shapes)
