"""Where and how computation runs: device choice, autocast precision, and the environment record of a run."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """auto picks CUDA, then MPS, then CPU; an explicit device that is not available is an error, not a fallback."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type not in ("cpu", "cuda", "mps"):  # meta, xpu, ...: devices torch names but this toolkit cannot run
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; choose device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} requested but MPS is not available; choose device cpu (or auto)")
    return device


def free_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated on `device` now: on CUDA the driver's free memory plus what PyTorch's caching
    allocator holds unused, on a Linux host MemAvailable; None where it is not known."""
    if device.type == "cuda":
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + unused
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_fits(nbytes: int, device: torch.device, what: str, fix: str) -> None:
    """Refuse an allocation larger than the free memory with a message instead of a kill: on Linux a too-large CPU
    tensor is granted (overcommit) and the OOM killer ends the process, unannounced, once it is written."""
    free = free_memory(torch.device(device))
    if free is not None and nbytes > free:
        raise ConfigError(f"{what} needs {nbytes / 2**30:,.1f} GiB, more than the {free / 2**30:,.1f} GiB free on "
                          f"{device}; {fix}")


def autocast_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 elsewhere (without AMX units a CPU runs bf16 matmuls
    slower; with them, small models still lose more to the casts than they gain: BENCHMARKS.md)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def environment() -> dict[str, Any]:
    """Everything needed to rerun: versions, hardware, git revision and command line."""
    versions = {}
    for pkg in ("transformer-lm", "torch", "numpy", "safetensors", "tokenizers", "jsonargparse"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "git_revision": rev,
        "argv": sys.argv,
    }
