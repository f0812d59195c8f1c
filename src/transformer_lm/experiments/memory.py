"""Training memory per device, from the config alone: weights, gradients, optimizer state and activations under DDP or
FSDP2, with or without activation checkpointing, for a micro-batch, sequence length, world size and precision.

The terms count what this package's training loop holds (fp32 parameters, AdamW, autocast for bf16/fp16), in bytes:

- weights: fp32 parameters, 4 B each: whole on every device under DDP; under FSDP2 a 1/world shard, plus the
  all-gathered parameters of the units in flight: the root (embeddings, final norm, LM head) and two blocks (the
  one computing, the one prefetched) — fp32, or bf16 under bfloat16, where FSDP2's MixedPrecisionPolicy gathers them
  in bf16.
- gradients: fp32, 4 B per parameter: whole under DDP (its buckets are views of them); under FSDP2 a shard, plus one
  block's unsharded gradients awaiting their reduce-scatter.
- optimizer: AdamW's two fp32 moments, 8 B per parameter (whole or sharded), plus, when the step is not fused (the
  foreach implementation used off CUDA), one temporary of the local parameter size during the step.
- autocast weight copies: under bf16/fp16, autocast casts each matmul weight once per forward and the backward keeps
  the copy: 2 B per matmul weight, whole on every device (DDP); none under FSDP2 in bf16, whose gathered weights are
  already bf16 and are freed after each block's forward and gathered again for its backward.
- activations: the tensors saved for the backward pass, counted for this model's ops (b sequences of s tokens, width
  h, FFN width f, n_head a, KV heads k, head size d). Per block: the residual-stream inputs of the two norms (fp32) and
  their statistics; the inputs of the Q/K/V projection, output projection and FFN matmuls; the Q/K/V projection's
  output (which the attention's inputs are views of, kept alive whole; with RoPE or grouped-query heads the rotated
  or repeated Q and K/V are new tensors besides); the fused attention's output (b·s·h, which is already the output
  projection's input) and its log-sum-exp (b·a·s, fp32); the FFN's hidden activations (2·b·s·f for GELU, 4·b·s·f
  for SwiGLU); 1-byte dropout masks when dropout > 0. Outside the blocks: the token ids, the final norm's input and
  output, and what the fused head and loss (loss.py) keep for the backward pass: the gradients of the head's weight
  (V·h) and of its input (b·s·h), fp32 (bf16 under FSDP2's bf16 policy). With activation checkpointing only each
  block's input is kept, and one block's activations are rebuilt at a time in the backward pass.
- logits transient: the fused head and loss's buffer at the end of the forward pass: fp32 logits, overwritten in
  place by their gradient, for b·s positions (or the rows of one chunk, loss.CHUNK_BYTES), beside the weighted copy
  of its input (b·s·h); under autocast also the low-precision copies its matmuls take of both. Under float16
  autocast the model keeps the plain loss (see model.head_loss): the fp32 log-softmax of the logits (b·s·V) is an
  activation instead, and the logits' gradient and the log-softmax's (b·s·V each) are alive at the start of the
  backward pass.

Peak ≈ weights + optimizer + the largest of: activations + logits transient + autocast copies (the end of the
forward pass); with activation checkpointing, the last block's backward (its whole block rebuilt beside that, an
upper bound: the backward frees each rebuilt tensor once used); the first block's backward (its activations beside
the other blocks' gradients); gradients + the optimizer step's temporary. Measured on CPU (tests/test_memory_plan.py,
PyTorch's memory tracker): peaks within 5% without activation checkpointing, within 15% with it.
The attention is assumed fused (scaled_dot_product_attention's flash or memory-efficient kernels: no b·a·s² matrix;
on CPU, attention dropout falls back to the math kernel, which this does not count), and the CUDA caching
allocator's fragmentation and the framework's own buffers (CUDA context, NCCL) are not counted: leave a few GB of
headroom.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..accounting import count_params
from ..config import ModelConfig
from ..errors import ConfigError
from ..loss import CHUNK_BYTES

Parallel = Literal["ddp", "fsdp"]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one training configuration."""

    parallel: Parallel
    world_size: int
    activation_checkpointing: bool
    weights: int
    gradients: int
    optimizer: int
    optimizer_step_temp: int
    autocast_copies: int
    activations: int
    """Saved for the backward pass at the end of the forward pass."""
    logits_transient: int
    block_activations: int
    """One block's activations: what the backward pass holds of the first block at its end (and rebuilds for
    each block in turn under activation checkpointing)."""
    layers: int
    logits_in_backward: int = 0
    """Logits-sized gradients still alive when the backward pass reaches the last block: none with the fused loss,
    the plain loss's two under float16 autocast."""

    @property
    def peak(self) -> int:
        forward_end = self.activations + self.logits_transient + self.autocast_copies
        # the backward pass of the last block: under checkpointing its activations are rebuilt beside the kept ones
        last_block = self.activations + self.logits_in_backward + self.block_activations + self.autocast_copies
        # the backward pass of the first block: its activations beside the other blocks' gradients
        first_block = self.block_activations + self.gradients * (self.layers - 1) // self.layers
        step = self.gradients + self.optimizer_step_temp
        return self.weights + self.optimizer + max(forward_end, last_block if self.activation_checkpointing else 0,
                                                   first_block, step)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak": self.peak}


def block_params(c: ModelConfig) -> int:
    return count_params(c).per_layer


def quantized_bytes(c: ModelConfig, bits: int, group_size: int = 128) -> float:
    """Bytes per weight of the blocks' matmuls quantized as quantize.py stores them: int8 with a float32 scale per
    output row, int4 with a float32 scale and zero point per group of inputs."""
    return 1 + 4 / c.n_embd if bits == 8 else 0.5 + 8 / group_size


def matmul_weights(c: ModelConfig) -> int:
    """Elements of the weights that go through matmuls (what autocast casts): Q/K/V, output projection, FFN, head."""
    qkv_out = (c.n_head + 2 * c.kv_heads) * c.head_dim
    per_layer = c.n_embd * qkv_out + c.n_embd * c.n_embd + (3 if c.mlp == "swiglu" else 2) * c.n_embd * c.ffn_dim
    return c.n_layer * per_layer + c.vocab_size * c.n_embd


def block_activations(c: ModelConfig, b: int, s: int, compute: int) -> int:
    """Bytes one block saves for its backward pass (see the module docstring)."""
    h, f, a, k, d = c.n_embd, c.ffn_dim, c.n_head, c.kv_heads, c.head_dim
    stats = (2 if c.norm == "layernorm" else 1) * b * s * 4  # mean and rstd (layernorm) or rstd (rmsnorm), fp32
    residual = 2 * (b * s * h * 4 + stats)  # the two norms' fp32 inputs
    matmul_inputs = 2 * b * s * h * compute  # the Q/K/V projection's and the FFN's inputs
    qkv = b * s * (a + 2 * k) * d * compute  # the projection's output, alive through its Q/K/V views
    rope = b * s * (a + k) * d * compute if c.pos_encoding == "rope" else 0  # rotated Q and K
    grouped = 2 * b * s * h * compute if k != a else 0  # K and V repeated to every query head
    attention = b * s * h * compute + b * a * s * 4  # output (= the output projection's input) and log-sum-exp
    ffn = (4 if c.mlp == "swiglu" else 2) * b * s * f * compute
    dropout = 2 * b * s * h if c.dropout > 0 else 0  # the residual dropouts' boolean masks
    return residual + matmul_inputs + qkv + rope + grouped + attention + ffn + dropout


def plan_memory(c: ModelConfig, batch_size: int, seq_len: int | None = None, world_size: int = 1,
                parallel: Parallel = "ddp", dtype: str = "bfloat16", activation_checkpointing: bool = False,
                fused_optimizer: bool = True, trained: int | None = None,
                base_bytes: float | None = None) -> MemoryPlan:
    """Memory per device of training `c` with `batch_size` sequences of `seq_len` tokens (default block_size) per
    device and micro-step, on `world_size` devices under `parallel`, autocast to `dtype` (float32: none).
    `fused_optimizer`: the fused AdamW step of CUDA (False: the foreach step used on CPU, with one temporary).
    `trained`: the parameters trained, where not all are (LoRA's adapters, beside frozen weights: lora.py), which
    alone have gradients and optimizer state; `base_bytes`: the bytes per weight the frozen weights of the blocks'
    matmuls are held in (None: float32, copied by autocast), the autocast precision's (lora.hold_base_in), which
    then makes no copies of them, or a quantized base's (QLoRA: quantized_bytes), each layer's weight then
    dequantized for its product alone."""
    if c.arch != "transformer":
        raise ConfigError(f"the memory planner models Transformer blocks; got arch {c.arch}")
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"parallel must be ddp or fsdp, got {parallel!r}")
    s = c.block_size if seq_len is None else seq_len
    for name, value, ok, rule in (("batch_size", batch_size, batch_size >= 1, ">= 1"),
                                  ("world_size", world_size, world_size >= 1, ">= 1"),
                                  ("seq_len", s, 1 <= s <= c.block_size, f"in [1, block_size={c.block_size}]")):
        if not ok:  # the one that is wrong, with its value (the message had listed all three rules)
            raise ConfigError(f"{name} must be {rule}, got {value}")
    b, compute = batch_size, DTYPE_BYTES[dtype]
    n = count_params(c).total
    per_block = block_params(c)
    sharded = parallel == "fsdp"
    local = -(-n // world_size) if sharded else n  # a shard rounds up
    mixed = sharded and dtype == "bfloat16"  # FSDP2's MixedPrecisionPolicy: bf16 all-gathers, no autocast copies
    in_flight = n - c.n_layer * per_block + min(2, c.n_layer) * per_block  # the root and two blocks, all-gathered
    weights = 4 * local + ((2 if mixed else 4) * in_flight if sharded else 0)
    if trained is not None:  # a LoRA fine-tune (DDP only): the frozen weights plus the adapters
        weights += 4 * trained
    if base_bytes is not None:
        weights -= round((4 - base_bytes) * (matmul_weights(c) - c.vocab_size * c.n_embd))  # the blocks', not the head
    learned = local if trained is None else trained
    gradients = 4 * learned + (4 * per_block if sharded else 0)
    optimizer = 8 * learned
    step_temp = 0 if fused_optimizer else 4 * learned
    copied = c.vocab_size * c.n_embd if base_bytes is not None else matmul_weights(c)  # the blocks' are not copied
    autocast = 2 * copied if compute != 4 and not mixed else 0
    if base_bytes is not None and base_bytes < 2:  # quantized: each layer's weight dequantized (float32), then cast
        autocast += (4 + compute) * c.n_embd * max(c.ffn_dim, (c.n_head + 2 * c.kv_heads) * c.head_dim)
    block = block_activations(c, b, s, compute)
    outside = b * s * 8 + b * s * c.n_embd * (4 + compute) + b * s * 4 * (2 if c.norm == "layernorm" else 1)
    kept = b * s * c.n_embd * 4 if activation_checkpointing else block  # per block: its fp32 input, or everything
    if dtype == "float16":  # model.head_loss keeps the plain loss: the fp32 log-softmax, then two b·s·V gradients
        outside += b * s * c.vocab_size * 4
        logits = in_backward = 2 * b * s * c.vocab_size * 4
    else:
        head = 2 if mixed else 4  # the head's weight and input: bf16 under FSDP2's policy, fp32 otherwise
        outside += (c.vocab_size + b * s) * c.n_embd * head  # their gradients, kept by the fused loss for the backward
        rows = min(b * s, max(1, CHUNK_BYTES // (4 * c.vocab_size)))  # positions in the loss's buffer at once
        low = 2 if compute != 4 else 0  # the half-precision copies the loss's matmuls take of the buffer and input
        logits, in_backward = rows * (c.vocab_size * (4 + low) + c.n_embd * (head + low)), 0
    return MemoryPlan(parallel, world_size, activation_checkpointing, weights, gradients, optimizer, step_temp,
                      autocast, c.n_layer * kept + outside, logits, block, c.n_layer, in_backward)
