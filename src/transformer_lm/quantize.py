"""Weight-only quantization of a finished model, by swapping its linear layers (as gpt-fast does).

    model = quantize(load_run(path).model, bits=8)          # int8, one symmetric scale per output channel
    model = quantize(model, bits=4, group_size=32)          # int4, one scale and zero point per group of inputs

Activations stay in floating point; only the weights are stored in fewer bits and dequantized on the fly. The
transformation is applied after loading and never written back: checkpoints always hold the float weights.

The LM head is quantized too (`head=True`, the default), always to int8: in a small model it is the largest matrix
(GPT-2: 38.6M of 124M parameters), so a float head would be most of what each decode step reads (int4 with a float
head held 206 MB of GPT-2's weights instead of 90), while its error lands directly on the logits, so even with int4
elsewhere it gets int8's 16× finer steps (as llama.cpp's 4-bit formats keep their output matrix at 6-8 bits). A head
tied to the token embedding stays tied: the embedding then looks up the same int8 rows and scales (Int8Embedding),
so the pair is held once, in int8.

Speed: eager PyTorch has no fast int8- or int4-weight matmul on CPU, so in eager mode they save memory, not time.
Under `torch.compile` (the compiled decode step, `--compile`) a one-row product is written as a fused
multiply-reduce that Inductor turns into one loop reading each int8 weight, or each byte of two int4 weights, once;
see Int8Linear.forward and Int4Linear.forward.

Where speed matters on a CPU, `dynamic=True` (`--quantize w8a8`) also quantizes the activations, per call: each input
is mapped onto int8 with one scale taken from its own range, and the product runs in int8 × int8 with int32 sums in
PyTorch's fbgemm kernels (`torch.ops.quantized.linear_dynamic`), which read the packed int8 weights at memory
bandwidth (GPT-2's 768 -> 3072 layer at one row: 0.05 ms vs 0.25 ms in fp32). This is no longer weight-only: the
activations' rounding adds error (measured as a perplexity delta in BENCHMARKS.md), so it is a separate choice.
The scale is the whole call's, so a row's result also depends on the rows beside it: batched generation and
speculative decoding (several rows or positions per call) then give one-by-one greedy's tokens only approximately;
with weight-only int8 / int4 they give them exactly.
"""

from __future__ import annotations

import itertools
import logging
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .layout import TransposedEmbedding, TransposedLinear

log = logging.getLogger(__name__)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w ≈ q * scale[:, None], scale = max|w_row| / 127.
    (out, in) float -> (out, in) int8, (out,) float32. Each element is off by at most scale/2."""
    w = w.float().contiguous()  # row-major q whatever w's strides (a TransposedLinear's weight is a transposed view)
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # an all-zero row keeps a tiny positive scale
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4-bit: each run of `group_size` inputs of a row maps [min, max] onto the 16 levels 0..15,
    w ≈ (q - zero) * scale with scale = (max - min) / 15, so each element is off by at most scale/2.
    (out, in) float -> packed (out, in/2) uint8, scales and zeros (out, in/group_size) float32. The zero point is kept
    in float, so 0 itself need not be a level. Byte k of a group holds its input k in the low nibble and its input
    k + group_size/2 in the high one: each nibble then meets a contiguous run of the input (see Int4Linear.forward)."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group_size, group_size)  # (out, groups, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    zero = -lo / scale  # the (fractional) level that dequantizes to 0
    q = torch.round(g / scale[..., None] + zero[..., None]).clamp(0, 15).to(torch.uint8)
    low, high = q.chunk(2, dim=-1)  # (out, groups, group/2): each group's first and second half
    return (low | (high << 4)).reshape(out_f, in_f // 2), scale, zero


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of quantize_int4 -> (out, in) float32."""
    out_f = packed.size(0)
    halves = packed.reshape(out_f, -1, group_size // 2)  # (out, groups, group/2)
    q = torch.cat((halves & 0xF, halves >> 4), dim=-1).float()  # (out, groups, group)
    return ((q - zero[..., None]) * scale[..., None]).reshape(out_f, -1)


MIN_INT4_GROUP = 16
"""The smallest int4 group that stores fewer bytes than int8: a group costs half a byte a weight plus 8 bytes (a
float32 scale and zero point), 1.0 a weight at 16, against int8's 1 + 4/in_features."""

WIDEN_BLOCK = 128
"""Output rows of an int8 weight widened to float at once by an eager few-row Int8Linear (128 × 3072 floats: 1.5 MB,
within one core's L2)."""


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W stored as int8 plus one float scale per output channel."""

    def __init__(self, linear: nn.Linear | TransposedLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_int8(linear.weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("scales", scale)  # float32 whatever the model dtype: a few values per row
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scale is per output channel, so it applies to the output: x (q·s)ᵀ = (x qᵀ)·s, one multiply per output
        # instead of per weight. torch._weight_int8pack_mm computes the same but measured 3-20× slower than the fp32
        # matmul on this project's CPU at 1-8 rows (torch 2.13), as did torch.compile of the widen-then-matmul form
        # (it does not fuse the widening into the GEMM).
        rows = x.numel() // self.in_features
        cpu = x.device.type == "cpu"
        if torch.compiler.is_compiling() and cpu and rows == 1:
            # A batch-1 decode step: Σ_i x_i q_ji as a multiply-reduce, which Inductor compiles into one loop that
            # widens each int8 weight as it uses it (1 byte read per weight; 1.5-1.8× faster than the fp32 matmul
            # on one core). Run eagerly, the same expression would materialize (out, in) floats. as_strided (a no-op
            # view of the contiguous row) makes Inductor store the row before the loop: otherwise it inlines the
            # producer (the residual add and layer norm before a projection) into the loop body and recomputes it for
            # every output (the GPT-2 step 20.6 -> 15.1 ms; BENCHMARKS.md).
            row = x.reshape(1, -1).contiguous()
            row = row.as_strided(row.shape, (self.in_features, 1))
            y = (row * self.weight.to(x.dtype)).sum(-1).view(*x.shape[:-1], -1)
        elif not torch.compiler.is_compiling() and cpu and rows <= 16:
            # Eager, few rows: widen WIDEN_BLOCK output rows at a time, so that the float copy stays in cache instead
            # of going through memory (the GPT-2 head at 1 row: 18 ms instead of 89; the fp32 head takes 10).
            y = torch.cat([F.linear(x, block.to(x.dtype)) for block in self.weight.split(WIDEN_BLOCK)], dim=-1)
        else:
            y = F.linear(x, self.weight.to(x.dtype))
        y = y * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """The token embedding of a model whose tied LM head became an Int8Linear: row i of the table is q_i · s_i, read
    from the head's own int8 weight and scales (the same buffers), so the tie holds and the table is held once."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", head.weight)
        self.register_buffer("scales", head.scales)
        self.dtype = dtype  # the float dtype of the embeddings it returns (the model's)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(idx, self.weight).to(self.scales.dtype)  # (..., n_embd) int8 levels
        return (rows * self.scales[idx].unsqueeze(-1)).to(self.dtype)


def _dynamic_kernels() -> bool:
    """Whether this PyTorch has the fbgemm int8 × int8 CPU kernels that W8A8Linear calls."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


class W8A8Linear(Int8Linear):
    """An Int8Linear whose product also quantizes its input, per call (int8 weights, int8 activations, int32 sums):
    y ≈ (x̂ q̂ᵀ)·s_x·s_w + b with x̂ = round(x / s_x). CPU only. The kernel reads its own packed copy of the levels;
    the plain int8 weight buffer is kept only where `keep_weight` (a tied head, whose embedding lookup reads it),
    else dropped: both copies held the weights twice (GPT-2: 286 MB resident instead of int8's 136)."""

    def __init__(self, linear: nn.Linear | TransposedLinear, keep_weight: bool = False) -> None:
        super().__init__(linear)
        with warnings.catch_warnings():  # torch >= 2.10 marks quantized tensor creation deprecated; the kernels stay
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(self.weight.float() * self.scales[:, None], self.scales.double(),
                                           torch.zeros(self.out_features, dtype=torch.long), 0, torch.qint8)
        bias = None if self.bias is None else self.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(q, bias)
        if not keep_weight:
            self.weight = None  # the levels live on in `packed` (dequantize() unpacks them)
        # Full-range activations need the VNNI int8 dot product; without it fbgemm's 16-bit intermediate sums could
        # saturate, so the inputs use 7 bits (PyTorch's own x86 default makes the same choice).
        self.reduce_range = not torch.cpu._is_vnni_supported()
        self._register()

    def dequantize(self) -> torch.Tensor:
        if self.weight is not None:
            return super().dequantize()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            levels = torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()
        return levels.to(self.scales.dtype) * self.scales[:, None]

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed levels the kernel reads per call (one int8 per weight), for the bytes-read
        accounting (perf.weight_bytes), where no buffer holds them."""
        return self.out_features * self.in_features if self.weight is None else 0

    def _register(self) -> None:
        self.key = next(_W8A8_KEYS)
        _W8A8_LAYERS[self.key] = self

    def __setstate__(self, state: dict) -> None:  # a deep copy is a new layer with its own key
        super().__setstate__(state)
        self._register()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features).float().contiguous()
        if torch.compiler.is_compiling():
            y = torch.ops.transformer_lm.w8a8_linear(x2d, self.key, self.out_features)
        else:  # the direct call, without the registered operator's dispatch
            y = _linear_dynamic(self, x2d)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


# torch.compile cannot trace the packed weights (a TorchScript object) as an argument, so the kernel call is an
# opaque operator that finds its layer by an integer key: the compiled decode step then stays one graph. It is
# defined with torch.library.Library and a CPU kernel rather than torch.library.custom_op, whose Python dispatch
# (~0.1 ms a call, 49 calls a GPT-2 token) made the compiled step slower than eager: 63-81 against 97-107 tokens/s.
_W8A8_KEYS = itertools.count()
_W8A8_LAYERS: weakref.WeakValueDictionary[int, W8A8Linear] = weakref.WeakValueDictionary()
_LIB = torch.library.Library("transformer_lm", "DEF")
_LIB.define("w8a8_linear(Tensor x, int key, int out_features) -> Tensor")


def _linear_dynamic(layer: W8A8Linear, x: torch.Tensor) -> torch.Tensor:
    """fbgemm's int8 × int8 product of `layer` on x (rows, in). Called with tensor subclasses' __torch_function__
    off: otherwise each call asks its arguments for one, and the packed weights (a TorchScript object) answer by
    throwing and catching a C++ exception, about 15 µs a call, half of a one-row call's fixed cost (49 calls a GPT-2
    token; BENCHMARKS.md). x is always a plain tensor here, so nothing else changes."""
    with torch._C.DisableTorchFunctionSubclass():
        return torch.ops.quantized.linear_dynamic.default(x, layer.packed, layer.reduce_range)


def _w8a8_linear_cpu(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return _linear_dynamic(_W8A8_LAYERS[key], x)


_LIB.impl("w8a8_linear", _w8a8_linear_cpu, "CPU")


@torch.library.register_fake("transformer_lm::w8a8_linear")
def _(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


class Int4Linear(nn.Module):
    """y = x Wᵀ + b with W stored as packed 4-bit levels plus a float scale and zero point per group of inputs.
    A compiled one-row product reads the packed bytes directly; otherwise the weight is dequantized at every
    forward, in blocks of rows for few-row inputs."""

    def __init__(self, linear: nn.Linear | TransposedLinear, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        packed, scale, zero = quantize_int4(linear.weight.detach(), group_size)
        self.register_buffer("weight", packed)
        self.register_buffer("scales", scale)  # float32, one per group of each row
        self.register_buffer("zeros", zero)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.weight, self.scales.float(), self.zeros.float(), self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        cpu = x.device.type == "cpu"
        if torch.compiler.is_compiling() and cpu and rows == 1:
            # A batch-1 decode step, as Int8Linear's: per group g of a row, Σ_i x_i (q_i - z_g) s_g =
            # s_g (Σ_i x_i q_i - z_g Σ_i x_i), so the loop over the packed bytes only widens nibbles and multiplies
            # them by the input (each byte read once), and the zero point and scale apply once per group.
            half = self.group_size // 2
            row = x.reshape(1, -1).contiguous()
            row = row.as_strided(row.shape, (self.in_features, 1)).view(-1, 2, half)  # stored first: see Int8Linear
            w = self.weight.view(self.out_features, -1, half)  # (out, groups, group/2)
            dots = ((w & 0xF).to(x.dtype) * row[:, 0] + (w >> 4).to(x.dtype) * row[:, 1]).sum(-1)  # (out, groups)
            sums = row.sum((-2, -1))  # (groups,): Σ_i x_i over each group
            y = ((dots - self.zeros.to(x.dtype) * sums) * self.scales.to(x.dtype)).sum(-1).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        if not torch.compiler.is_compiling() and cpu and rows <= 16:
            # Eager, few rows: dequantize WIDEN_BLOCK output rows at a time (in cache), as Int8Linear does (the GPT-2
            # step 106-109 ms instead of 135-197 for the whole matrix at once; still ~4x the fp32 step).
            blocks = zip(self.weight.split(WIDEN_BLOCK), self.scales.split(WIDEN_BLOCK), self.zeros.split(WIDEN_BLOCK))
            y = torch.cat([F.linear(x, dequantize_int4(w, s.float(), z.float(), self.group_size).to(x.dtype))
                           for w, s, z in blocks], dim=-1)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantize().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}")


def check_quantize(model: nn.Module, bits: int = 8, group_size: int = 128, head: bool = True,
                   dynamic: bool = False) -> list[tuple[str, nn.Module]]:
    """Raise ConfigError unless quantize() can quantize `model` so: before any swap (a failure leaves the model
    untouched) and, from `tlm bench`, before minutes of float measurements. -> the (name, layer) pairs to swap."""
    if bits not in (4, 8):
        raise ConfigError(f"quantization supports 8 or 4 bits, got {bits}")
    if dynamic:
        device = next(model.parameters()).device
        if bits != 8 or device.type != "cpu" or not _dynamic_kernels():
            raise ConfigError(f"w8a8 (int8 activations too) runs on PyTorch's fbgemm CPU kernels; this is {bits}-bit "
                              f"on {device.type}{'' if _dynamic_kernels() else ' without fbgemm'}: use int8 instead")
    if any(isinstance(m, Int8Linear | Int4Linear) for m in model.modules()):
        raise ConfigError("the model is quantized already (its float weights are gone); load the run again to "
                          "quantize it another way")
    arch = getattr(getattr(model, "config", None), "arch", "transformer")
    if arch != "transformer":  # its only nn.Linear is the LM head, which stays in floating point
        raise ConfigError(f"weight-only quantization swaps the attention and feed-forward layers; an {arch} model "
                          "has none (its recurrent weights live in torch's fused cell): use it unquantized")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear | TransposedLinear)
               and (head or name != "lm_head")]
    if bits == 4:
        if group_size < 2 or group_size % 2:
            raise ConfigError(f"int4 group_size must be an even number >= 2, got {group_size}")
        widths = {m.in_features for name, m in targets if name != "lm_head"}
        bad = sorted(w for w in widths if w % group_size)
        if bad:
            fits = max((g for g in range(MIN_INT4_GROUP, 129, 2) if all(w % g == 0 for w in widths)), default=None)
            hint = f"e.g. {fits} (--quantize int4:{fits})" if fits else \
                f"or int8 (no group of {MIN_INT4_GROUP} or more divides them, and smaller ones store more than int8)"
            raise ConfigError(f"int4 group_size {group_size} does not divide the input width(s) {bad}; choose a "
                              f"divisor of every width, {hint}")
    return targets


def quantize(model: nn.Module, bits: int = 8, group_size: int = 128, head: bool = True,
             dynamic: bool = False) -> nn.Module:
    """Swap the linear layers of `model` (nn.Linear, or layout.TransposedLinear) for Int8Linear (bits=8) or
    Int4Linear (bits=4, groups of `group_size` inputs), in place; returns the model, in eval mode. `head` also
    quantizes the LM head, to int8 whatever `bits` (see the module doc), and a tied token embedding with it
    (Int8Embedding). `dynamic` (int8 on a CPU) takes W8A8Linear instead: activations quantized per call too, for
    speed. Apply it to a loaded model: the quantized modules are for inference only and are not saved."""
    targets = check_quantize(model, bits, group_size, head, dynamic)
    if bits == 4 and group_size < MIN_INT4_GROUP:
        log.warning("int4 groups of %d store %.2f bytes per weight (a half-byte level, and 8 bytes of scale and zero "
                    "per group): no fewer than int8; use int8 or a group of %d or more", group_size,
                    0.5 + 8 / group_size, MIN_INT4_GROUP)
    tied = head and _head_is_tied(model)
    emb_dtype = model.tok_emb.weight.dtype if tied else None
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if bits == 8 or name == "lm_head":
            q = W8A8Linear(linear, keep_weight=tied and name == "lm_head") if dynamic else Int8Linear(linear)
        else:
            q = Int4Linear(linear, group_size)
        setattr(parent, child, q)
    if tied:
        model.tok_emb = Int8Embedding(model.lm_head, emb_dtype)
    return model.eval()


def _head_is_tied(model: nn.Module) -> bool:
    """Whether the LM head shares its weight with the token embedding (in either layout)."""
    emb, head = getattr(model, "tok_emb", None), getattr(model, "lm_head", None)
    if isinstance(emb, TransposedEmbedding):
        return isinstance(head, TransposedLinear) and emb.weight_t is head.weight_t
    return isinstance(emb, nn.Embedding) and isinstance(head, nn.Linear) and emb.weight is head.weight


def parse_quantize(spec: str) -> dict[str, int | bool]:
    """The CLI's --quantize values as quantize() arguments: 'int8' -> 8 bits, 'w8a8' -> 8 bits with dynamic
    activations, 'int4' -> 4 bits in groups of 128, 'int4:32' -> groups of 32."""
    name, colon, group = spec.partition(":")
    bits = {"int8": 8, "w8a8": 8, "int4": 4}.get(name)
    if bits is None or (colon and (bits == 8 or not group.isdigit())):  # 'int4:' names no group
        raise ConfigError(f"--quantize must be int8, w8a8, int4 or int4:GROUP_SIZE (e.g. int4:32), got {spec!r}")
    return {"bits": bits, "group_size": int(group) if group else 128, "dynamic": name == "w8a8"}
