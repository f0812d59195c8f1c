"""Data parallelism as a transformation of a finished model: `parallelize(model, dist, cfg)` applies compile, then DDP
or FSDP2 (`fully_shard` on each block, then the root). Processes are started by PyTorch's own launcher, torchrun, and
communicate through torch.distributed (gloo on CPU, NCCL on CUDA); nothing here launches or communicates by itself.

Batch scheme: `train.batch_size` is the GLOBAL micro-batch. Every rank draws the same global batch from an identically
seeded sampler and keeps its contiguous slice of batch_size / world_size rows; gradients are averaged over ranks, so
each step's gradient is the single-process gradient of the same global batch (up to floating-point reduction order)
and the loss curve does not depend on the world size.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .config import TrainConfig
from .errors import ConfigError, TLMError
from .runtime import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. The single-process default has rank 0 of world 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, logs metrics and shows progress."""
        return self.rank == 0


def dist_from_env() -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); without it, a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def check_batch(batch_size: int, info: DistInfo) -> None:
    if batch_size % info.world_size:
        raise ConfigError(f"train.batch_size {batch_size} is not divisible by the world size {info.world_size}; "
                          f"batch_size is the global micro-batch, so use a multiple of {info.world_size}")


def device_for(info: DistInfo, name: str) -> torch.device:
    """The device of this rank: one CUDA device per local rank, or the CPU."""
    device = resolve_device(name)
    if info.enabled and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
    if info.enabled and device.type == "mps":
        raise ConfigError("distributed training supports cpu (gloo) and cuda (nccl); use --train.device cpu")
    return device


@contextlib.contextmanager
def distributed(info: DistInfo, device: torch.device) -> Iterator[None]:
    """Initialize the process group for a multi-process run (gloo on CPU, NCCL on CUDA) and always destroy it on the
    way out, on errors and Ctrl-C too. A group the caller already initialized is used and left alone."""
    if not info.enabled or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def parallelize(model: nn.Module, info: DistInfo, cfg: TrainConfig) -> nn.Module:
    """Compile (if cfg.compile), then wrap for data parallelism when world_size > 1. Returns the module to call for
    the forward pass. FSDP2 shards `model` in place, so build the optimizer after this step."""
    if not info.enabled:
        return torch.compile(model) if cfg.compile else model
    if cfg.compile:  # per block, in place (as torchtitan): the wrappers below then see the compiled blocks
        for block in model.blocks:
            block.compile()
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)  # the root: embeddings, final norm and (tied) LM head
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on micro-steps that are not the last of an optimizer step."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped, DistributedDataParallel) and not sync:
        with wrapped.no_sync():
            yield
    elif isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; under FSDP2 the norm of sharded gradients is reduced over ranks."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def mean_over_ranks(values: list[float], info: DistInfo) -> list[float]:
    """Each number's mean over all ranks, in one all-reduce (a rank's loss is over an equal share of the batch)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return (t / info.world_size).tolist()


def on_main(fn: Callable[..., T], info: DistInfo, *args: Any, **kwargs: Any) -> T:
    """Run `fn` on rank 0 only and give its result, or its TLMError, to every rank."""
    if not info.enabled:
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    if info.is_main:
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except TLMError as e:
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU (gathered from shards under FSDP2; a collective: call on every rank).
    Only rank 0 receives the tensors; the other ranks get an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with every sharded (DTensor) state gathered whole onto the CPU: the same format as a
    single-process run's, so a checkpoint resumes under any world size. A collective under FSDP2: call on every rank."""
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    sd["state"] = {k: {n: v.full_tensor().cpu() if isinstance(v, DTensor) else v for n, v in s.items()}
                   for k, s in sd["state"].items()}
    return sd


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a whole (single-process format) optimizer state, keeping only this rank's shard of sharded parameters."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for k, s in sd["state"].items():
        p = params[int(k)]
        if isinstance(p, DTensor):  # each rank holds the whole tensor: keep the local shard, no communication
            s = {n: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                 if isinstance(v, torch.Tensor) and v.shape == p.shape else v for n, v in s.items()}
        state[k] = s
    optimizer.load_state_dict({**sd, "state": state})
