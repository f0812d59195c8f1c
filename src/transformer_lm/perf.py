"""How close a run comes to the hardware: peak FLOP/s, memory bandwidth, MFU and MBU.

- **MFU** (model FLOPs utilization, PaLM, Chowdhery et al. 2022): the model's FLOPs per token × tokens per second,
  over the device's peak FLOP/s. What training is judged by (compute-bound).
- **MBU** (model bandwidth utilization): bytes that must be read per token × tokens per second, over the memory
  bandwidth. What decoding at small batch is judged by (memory-bound: every weight is read once per step).

Peaks come from the vendors' datasheets for known accelerators (`ACCELERATORS`, also the planner's table); for any
other device (every CPU) from a matmul timed once at first use. Bandwidth is always measured: a large tensor copy,
counting the bytes read plus the bytes written. Both measurements are cached per device (and dtype).
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import ConfigError

Precision = Literal["bf16", "fp32"]


@dataclass(frozen=True)
class Accelerator:
    """One accelerator's vendor peak figures. Peaks are dense (no 2:4 sparsity), per chip."""

    name: str
    bf16_tflops: float
    """Peak dense bf16 tensor/matrix TFLOP/s (fp32 accumulate)."""
    fp32_tflops: float | None
    """Peak plain fp32 TFLOP/s (not TF32); None where the vendor publishes none."""
    tdp_watts: float | None
    """Thermal design power (board power); None where the vendor publishes none."""
    memory_gb: float
    """Device memory, GB as marketed."""
    source: str
    """Where the numbers come from."""
    note: str = ""
    device_pattern: str | None = None
    """Regular expression that finds this chip in `torch.cuda.get_device_name()` (None: not a torch device)."""

    def peak_tflops(self, precision: Precision) -> float | None:
        return self.bf16_tflops if precision == "bf16" else self.fp32_tflops


# Vendor datasheet figures. The key is the name accepted by `--hardware` (matching ignores case, spaces, '-' and '_').
ACCELERATORS: dict[str, Accelerator] = {a.name.lower(): a for a in [
    # NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity; FP32 67; up to 700 W; 80 GB. The NVL
    # boards ("NVIDIA H100 NVL", "NVIDIA H200 NVL") are slower: the SXM patterns leave them to their own rows.
    Accelerator("H100-SXM", 989.4, 67.0, 700, 80, "NVIDIA H100 Tensor Core GPU datasheet (SXM5)",
                device_pattern=r"H100(?!.*(PCIe|NVL))"),
    # same datasheet, PCIe column: BF16 1,513 with sparsity; FP32 51; 300-350 W
    Accelerator("H100-PCIe", 756.5, 51.0, 350, 80, "NVIDIA H100 Tensor Core GPU datasheet (PCIe)",
                device_pattern=r"H100.*PCIe"),
    # same datasheet, H100 NVL column: BF16 1,671 with sparsity; FP32 60; 350-400 W; 94 GB
    Accelerator("H100-NVL", 835.5, 60.0, 400, 94, "NVIDIA H100 Tensor Core GPU datasheet (NVL)",
                device_pattern=r"H100.*NVL"),
    # NVIDIA H200 Tensor Core GPU datasheet: BF16 1,979 with sparsity; FP32 67; up to 700 W; 141 GB
    Accelerator("H200", 989.4, 67.0, 700, 141, "NVIDIA H200 Tensor Core GPU datasheet (SXM)",
                device_pattern=r"H200(?!.*NVL)"),
    # same datasheet, H200 NVL column: BF16 1,671 with sparsity; FP32 60; up to 600 W; 141 GB
    Accelerator("H200-NVL", 835.5, 60.0, 600, 141, "NVIDIA H200 Tensor Core GPU datasheet (NVL)",
                device_pattern=r"H200.*NVL"),
    # NVIDIA A100 Tensor Core GPU datasheet: BF16 312 (624 sparse); FP32 19.5; 400 W (SXM)
    Accelerator("A100-80GB", 312.0, 19.5, 400, 80, "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM)",
                device_pattern=r"A100.*80GB"),
    Accelerator("A100-40GB", 312.0, 19.5, 400, 40, "NVIDIA A100 Tensor Core GPU datasheet (40GB SXM)",
                device_pattern=r"A100(?!.*80GB)"),
    # NVIDIA V100 Tensor Core GPU datasheet: Tensor 125 (fp16); FP32 15.7; 300 W (SXM2); 32 GB. Its PCIe boards
    # ("Tesla V100-PCIE-32GB": 112, 14, 250 W; "Tesla V100S-PCIE-32GB": 130, 16.4, 250 W) have their own rows.
    Accelerator("V100", 125.0, 15.7, 300, 32, "NVIDIA V100 Tensor Core GPU datasheet (SXM2)",
                note="no bf16: the half-precision figure is fp16 tensor cores", device_pattern=r"V100(?!S)(?!-PCIE)"),
    Accelerator("V100-PCIe", 112.0, 14.0, 250, 32, "NVIDIA V100 Tensor Core GPU datasheet (PCIe)",
                note="no bf16: the half-precision figure is fp16 tensor cores", device_pattern=r"V100-PCIE"),
    Accelerator("V100S-PCIe", 130.0, 16.4, 250, 32, "NVIDIA V100S Tensor Core GPU datasheet (PCIe)",
                note="no bf16: the half-precision figure is fp16 tensor cores", device_pattern=r"V100S"),
    # NVIDIA Ada Lovelace GPU architecture whitepaper, RTX 4090: FP16/BF16 tensor with FP32 accumulate 165.2 dense;
    # FP32 82.6; 450 W total graphics power; 24 GB
    Accelerator("RTX-4090", 165.2, 82.6, 450, 24, "NVIDIA Ada Lovelace GPU architecture whitepaper (GeForce RTX 4090)",
                device_pattern=r"RTX 4090"),
    # NVIDIA L4 Tensor Core GPU datasheet: BF16 242 with sparsity; FP32 30.3; 72 W; 24 GB
    Accelerator("L4", 121.0, 30.3, 72, 24, "NVIDIA L4 Tensor Core GPU datasheet", device_pattern=r"\bL4\b"),
    # AMD Instinct MI300X data sheet: BF16 1,307.4 dense; FP32 vector 163.4; 750 W; 192 GB HBM3
    Accelerator("MI300X", 1307.4, 163.4, 750, 192, "AMD Instinct MI300X accelerator data sheet",
                device_pattern=r"MI300X"),
    # AMD Instinct MI250X data sheet: BF16 383; FP32 vector 47.9; 560 W; 128 GB HBM2e
    Accelerator("MI250X", 383.0, 47.9, 560, 128, "AMD Instinct MI250X accelerator data sheet",
                device_pattern=r"MI250X"),
    # Google Cloud TPU v5e documentation: 197 bf16 TFLOPS per chip, 16 GB HBM2; no fp32 peak or TDP published
    Accelerator("TPU-v5e", 197.0, None, None, 16, "Google Cloud TPU v5e documentation (per chip)"),
    # Google Cloud TPU v5p documentation: 459 bf16 TFLOPS per chip, 95 GB HBM2e; no fp32 peak or TDP published
    Accelerator("TPU-v5p", 459.0, None, None, 95, "Google Cloud TPU v5p documentation (per chip)"),
]}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def accelerator(name: str) -> Accelerator:
    """The accelerator called `name` (case, spaces, '-' and '_' ignored)."""
    by_key = {_key(k): a for k, a in ACCELERATORS.items()}
    if _key(name) not in by_key:
        names = ", ".join(a.name for a in ACCELERATORS.values())
        raise ConfigError(f"unknown hardware {name!r}; choose one of: {names} (or all)")
    return by_key[_key(name)]


def known_accelerator(device: torch.device) -> Accelerator | None:
    """The table entry for a CUDA/ROCm device, found by its name; None for CPUs and unlisted chips."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((a for a in ACCELERATORS.values() if a.device_pattern and re.search(a.device_pattern, name)), None)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing an asynchronous device needs it; a CPU is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """time.perf_counter() once the device's queued work is done."""
    synchronize(device)
    return time.perf_counter()


def _best_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: first-call allocation and kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = now(device)
        fn()
        best = min(best, now(device) - start)
    return best


def measured_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                          repeats: int = 5) -> float:
    """FLOP/s of n×n inputs times an n×n weight stored as nn.Linear stores it (x @ Wᵀ, 2n³ FLOPs), best of
    `repeats`: a practical peak where no datasheet applies. The layout is that of the products a model computes:
    on this CPU (no bf16 units) a bf16 product of plain [in, out] operands ran at 0.35-0.5 GFLOP/s at n = 1024,
    13× slower than x @ Wᵀ, so a `--train.dtype bfloat16` run's MFU read several times 100 %, and timing the six
    products held it 30 s before its first step."""
    n = n or (1024 if device.type == "cpu" else 8192)
    rng = torch.Generator(device).manual_seed(0)  # a private generator: measuring must not move the global RNG
    x = torch.randn(n, n, device=device, generator=rng).to(dtype)
    w = torch.randn(n, n, device=device, generator=rng).to(dtype)  # [out, in]
    return 2 * n**3 / _best_time(lambda: F.linear(x, w), device, repeats)


@functools.cache
def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s of `device` at `dtype`: the datasheet's dense figure for a known accelerator (bf16/fp16 →
    its tensor-core peak, fp32 → its plain fp32 peak), else a matmul measured now (cached: measured once)."""
    device = torch.device(device)
    chip = known_accelerator(device)
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32  # TF32 beats the plain fp32 figure
    if chip is not None and not tf32:
        peak = chip.peak_tflops("fp32" if dtype == torch.float32 else "bf16")
        if peak is not None:
            return peak * 1e12
    return measured_matmul_flops(device, dtype)


@functools.cache
def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """measured_copy_bandwidth, measured once per process (the figure start-up MBU readings divide by)."""
    return measured_copy_bandwidth(device, nbytes, repeats)


def measured_copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Memory bandwidth of `device` in bytes/s: (bytes read + bytes written) per second of a tensor copy, best of
    `repeats`. The default size (256 MiB on CPU, 1 GiB on GPU) exceeds the caches, so this is DRAM/HBM speed."""
    device = torch.device(device)
    nbytes = nbytes or (256 if device.type == "cpu" else 1024) * 2**20
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best_time(lambda: dst.copy_(src), device, repeats)


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    """Model FLOPs utilization: the fraction of the peak FLOP/s that the model's own FLOPs use."""
    return flops_per_token * tokens_per_s / peak


def mbu(bytes_per_token: float, tokens_per_s: float, bandwidth: float) -> float:
    """Model bandwidth utilization: the fraction of the memory bandwidth spent reading what each token needs."""
    return bytes_per_token * tokens_per_s / bandwidth


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once (a tied matrix counted once), except
    that an embedding table not shared with a matmul is read one row per token, so counts one row; plus the levels
    W8A8Linear's kernel holds outside any buffer."""
    matmul_ids = {id(m.weight) for m in model.modules() if not isinstance(m, nn.Embedding) and
                  isinstance(getattr(m, "weight", None), torch.Tensor)}
    lookup = {id(m.weight): m.weight[0].numel() * m.weight.element_size() for m in model.modules()
              if isinstance(m, nn.Embedding) and id(m.weight) not in matmul_ids}
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += lookup.get(id(t), t.numel() * t.element_size())
    return total + sum(getattr(m, "packed_bytes", 0) for m in model.modules())  # w8a8's kernel-held levels


def kv_cache_bytes(config: ModelConfig, context: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of keys and values of every layer at `context` positions per row: what one decode step reads back,
    and the size of a cache of that many slots."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layer * batch * config.kv_heads * context * config.head_dim * itemsize


def cache_read_bytes(config: ModelConfig, context: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of cached state one decode step reads for `batch` rows at `context` positions: a Transformer's keys and
    values, of the last sliding_window positions only where there is a window (as accounting.flops_per_token
    charges only their attention: Mistral-7B's MBU at 32k positions was overstated 1.25×); a recurrent model's
    state after the last position only (h, and an LSTM's c, of every layer), whatever the context."""
    if config.arch == "transformer":
        keys = min(context, config.sliding_window) if config.sliding_window else context
        return kv_cache_bytes(config, keys, batch, dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (2 if config.arch == "lstm" else 1) * config.n_layer * batch * config.n_embd * itemsize


def decode_bytes_per_token(model: nn.Module, config: ModelConfig, context: int, batch: int = 1,
                           dtype: torch.dtype = torch.float32) -> float:
    """Bytes read per generated token by a decode step over `batch` rows at `context` cached positions: the weights
    once per step (shared by the rows) plus each row's cached state (cache_read_bytes), divided by the rows."""
    return (weight_bytes(model) + cache_read_bytes(config, context, batch, dtype)) / batch


def decode_mbu(model: nn.Module, tokens_per_s: float, context: int, batch: int = 1) -> float:
    """MBU of decoding `model` at `tokens_per_s` (all rows together) with `context` cached positions per row
    (a mean, for a whole generation), against the measured copy bandwidth of the model's device."""
    p = next(model.parameters())
    per_token = decode_bytes_per_token(model, model.config, context, batch, p.dtype)
    return mbu(per_token, tokens_per_s, copy_bandwidth(p.device))
