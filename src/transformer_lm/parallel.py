"""Data parallelism as a transformation of a finished model: `parallelize(model, dist, cfg)` applies activation
checkpointing, then compile, then DDP or FSDP2 (`fully_shard` on each block, then the root). Processes are started
by PyTorch's own launcher, torchrun, and communicate through torch.distributed (gloo on CPU, NCCL on CUDA); nothing
here launches or communicates by itself.

Batch scheme: `train.batch_size` is the GLOBAL micro-batch. Every rank draws the same global batch from an identically
seeded sampler and keeps its contiguous slice of batch_size / world_size rows; gradients are averaged over ranks, so
each step's gradient is the single-process gradient of the same global batch (up to floating-point reduction order)
and the loss curve does not depend on the world size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .config import TrainConfig
from .errors import ConfigError, DistributedError, TLMError
from .runtime import autocast_dtype, resolve_device

T = TypeVar("T")
log = logging.getLogger(__name__)
_started_group = False  # whether this process ever initialized a process group (see `leave`)
_lost_collectives: list[BaseException] = []  # failed collectives' errors, never freed (see `distributed`)
_ended_groups: list[dist.ProcessGroup | None] = []  # destroyed process groups, never freed (see `distributed`)


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
    def number(name: str, default: str | None) -> int:
        value = os.environ.get(name, default)
        if value is None or not value.strip().isdigit():
            raise ConfigError(f"the environment's {name}={value!r} is not a process count or index; torchrun sets "
                              "RANK, WORLD_SIZE and LOCAL_RANK together: unset WORLD_SIZE outside torchrun")
        return int(value)

    world = number("WORLD_SIZE", "1")
    if world <= 1:
        return DistInfo()
    rank = number("RANK", None)
    if rank >= world:
        raise ConfigError(f"the environment's RANK={rank} is not below WORLD_SIZE={world}; launch with torchrun")
    return DistInfo(rank, world, number("LOCAL_RANK", "0"))


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
def distributed(info: DistInfo, device: torch.device, timeout: float = 1800.0) -> Iterator[None]:
    """Initialize the process group for a multi-process run (gloo on CPU, NCCL on CUDA) and always destroy it on the
    way out, on errors and Ctrl-C too. A group the caller already initialized is used and left alone.

    A collective that waits longer than `timeout` seconds for the other ranks fails, and so does one whose peer died:
    either becomes a `DistributedError` naming this rank, so no rank hangs on a dead or stuck job."""
    if not info.enabled or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    global _started_group
    _started_group = True
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None, timeout=timedelta(seconds=timeout))
    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        if not _lost_contact(e):
            raise
        # Kept until the process ends (through `leave`): the error's traceback holds the frames that hold the model,
        # and freeing a DDP model frees its process group on this thread with the interpreter lock held, which
        # joins a gloo worker thread that is itself waiting for that lock to free the failed collective: a deadlock
        # (the rank printed its error and hung, 1 lost-rank run in ~20 here; py-spy: `~Reducer` ->
        # `~ProcessGroupGloo` -> `thread::join` against `~AsyncWork` -> `gil_scoped_acquire`).
        _lost_collectives.append(e)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"rank {info.rank} of {info.world_size}: another rank died or stopped answering "
                               f"({first}); the job stops here, continue it from the last checkpoint with --resume "
                               "(see the other ranks' logs for the cause)") from e
    finally:
        # Kept until the process ends (through `leave`), for the same reason: freeing the last reference to the group
        # here runs its destructor on this thread with the interpreter lock held, and the destructor joins the gloo
        # worker thread that may still be freeing the last collective's tensors, which needs that lock. It did after
        # on_main's broadcast of an error, raised at once: ranks hung in `destroy_process_group` and torchrun ended
        # them unheard (torch 2.7, 7 runs in 20 of a resume without a checkpoint; py-spy: `~ProcessGroupGloo` ->
        # `thread::join` against `~AsyncBroadcastWork` -> `gil_scoped_acquire`).
        _ended_groups.append(dist.group.WORLD)
        dist.destroy_process_group()


def leave(code: int) -> None:
    """End a torchrun worker with exit status `code` once its work is done, without the interpreter's finalization, if
    this process ran a process group; otherwise return, for a normal exit.

    Gloo's worker threads outlive `destroy_process_group` (something still references the group object) and free
    each finished collective on their own thread. Freeing one whose tensors still hold a Python object needs the
    interpreter lock; if finalization has begun by then, Python ends the thread with `pthread_exit`, whose unwind
    through a C++ destructor calls std::terminate: a rank that finished its work dies of SIGABRT ("terminate called
    without an active exception"), torchrun reports the job failed and the other node's agent waits for it (core
    dump: `runLoop` → `~AsyncBroadcastWork` → `decref_pyobject` → `take_gil` → `pthread_exit`, while the main thread
    was in `Py_FinalizeEx`; 1 launch in 20-150 here, pytorch/pytorch#190489). After a lost peer, freeing the group
    can also deadlock (its destructor joins a thread that waits for the lock). Everything this process writes is
    closed by then, so leaving at once loses nothing: output is flushed first."""
    if not _started_group:
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code)


def _lost_contact(e: BaseException) -> bool:
    """Whether a collective failed because of the other ranks (a closed connection or a timeout), not a bug here:
    NCCL and the store raise torch.distributed's error types, gloo a RuntimeError from its transport."""
    return isinstance(e, dist.DistError) or "gloo" in str(e)


def compile_works(device: torch.device) -> bool:
    """Whether torch.compile works on this machine for `device` — dynamo supports this Python, and the backend's
    toolchain (a C++ compiler on CPU, Triton on GPU) is there —, tried on a two-op function (compiled once per
    process, cached on disk). When it does not, logs one warning and returns False: the run trains eagerly."""
    try:
        probe = torch.compile(lambda x: torch.sin(x) + 1.0)
        probe(torch.ones(8, device=device))
    except Exception as e:  # noqa: BLE001 - any failure means no compile here, whatever its type
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        log.warning("torch.compile does not work here (%s: %s); training runs eagerly", type(e).__name__, reason)
        return False
    return True


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing: wrap each block so that the backward pass recomputes its forward instead of reading
    stored activations. Only each block's input stays alive between forward and backward; dropout masks are
    recomputed from the saved RNG state, so gradients are those of the unwrapped model. State-dict keys are unchanged
    (the wrapper strips its prefix), so checkpoints do not depend on this setting."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError("train.activation_checkpointing recomputes Transformer blocks; this model has none (a "
                          "recurrent model): drop the option")
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block)


def parallelize(model: nn.Module, info: DistInfo, cfg: TrainConfig) -> nn.Module:
    """Transform a finished model for training, in torchtitan's order: activation checkpointing (each block wrapped),
    then compile, then DDP or FSDP2 when world_size > 1 — so the compiled regions include the recomputation and the
    data-parallel hooks wrap compiled blocks. Returns the module to call for the forward pass; `model` keeps its
    state-dict keys. FSDP2 shards `model` in place, so build the optimizer after this step."""
    if cfg.activation_checkpointing:
        checkpoint_blocks(model)
    compile = cfg.compile and compile_works(next(model.parameters()).device)
    if not info.enabled:
        return torch.compile(model) if compile else model
    if compile:  # per block, in place (as torchtitan): the wrappers below then see the compiled blocks
        for block in getattr(model, "blocks", [model]):  # a recurrent model (no blocks) is compiled whole
            block.compile()
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 runs: blocks gathered and computed in bf16 (half the all-gather traffic), gradients reduce-scattered
        # in fp32; the sharded master weights and the optimizer state stay fp32
        amp = autocast_dtype(next(model.parameters()).device, cfg.dtype)
        mp = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp == torch.bfloat16 else \
            MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)  # the root: embeddings, final norm and (tied) LM head
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    # gradients as views of the all-reduce buckets: one copy of the gradients instead of two; no buffer broadcast
    # before each forward: a model's buffers are the same on every rank (QLoRA's quantized weights, quantized alike
    # from the same base: broadcast, gigabytes a step), and none is a running statistic
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, broadcast_buffers=False)


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


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a whole (single-process format) optimizer state, keeping only this rank's shard of sharded parameters."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from .optim import check_optimizer_state

    check_optimizer_state(optimizer, sd)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for k, s in sd["state"].items():
        p = params[int(k)]
        if isinstance(p, DTensor):  # each rank holds the whole tensor: keep the local shard, no communication
            s = {n: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                 if isinstance(v, torch.Tensor) and v.shape == p.shape else v for n, v in s.items()}
        state[k] = s
    optimizer.load_state_dict({**sd, "state": state})
