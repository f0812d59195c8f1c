"""Training: a short loop over stateful components (model, optimizer, batch sampler, RNG), checkpointed so that a
resumed run continues exactly where the interrupted one stopped.

Run folder: config.json (resolved model/train/data config), tokenizer.json, env.json (versions, hardware, git
revision), metrics.jsonl (one JSON object per logged step or evaluation), loss.png, checkpoints/.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .accounting import count_params, flops_per_token
from .chat import CHAT_TEMPLATE_FILE, read_chat_template
from .checkpoint import (
    atomic_write_text,
    begin_checkpoint,
    check_out,
    clear_out,
    commit_checkpoint,
    is_sharded,
    latest_checkpoint,
    load_shards,
    load_state,
    load_weights,
    save_checkpoint,
    save_shards,
)
from .config import ModelConfig, TrainConfig, dump_json
from .data import PreparedData
from .errors import CheckpointError, ConfigError, DivergenceError
from .evaluate import EvalResult, evaluate_tokens, predicted_bytes_per_token
from .lora import adapters, add_lora, base_bytes, hold_base_in, load_adapters, lora_params, quantize_base
from .model import build_model
from .optim import config_hyperparameters, fused_adamw, lr_at, make_optimizer, set_lr
from .parallel import (
    DistInfo,
    check_batch,
    clip_grad_norm,
    device_for,
    dist_from_env,
    distributed,
    gradient_sync,
    load_optimizer_state,
    mean_over_ranks,
    on_main,
    parallelize,
)
from .perf import mfu, peak_flops
from .preference import DPO, PairSampler, PreferenceResult
from .quantize import parse_quantize
from .recurrent import runs_in_float32, warn_unused_fields
from .runtime import autocast, autocast_dtype, check_fits, environment
from .tokenizers import load_tokenizer, save_tokenizer
from .windows import BatchSampler, iter_eval_batches, warn_long_examples

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    elapsed: float
    """Seconds of training, summed over resumed segments."""
    val: EvalResult | PreferenceResult | None
    """The last evaluation: of preference pairs (DPO), a PreferenceResult."""
    interrupted: bool
    is_main: bool = True
    """False on the ranks other than 0 of a distributed run, which write nothing and report nothing."""


class Budget:
    """The run's end, by iterations, tokens or wall-clock time, whichever comes first, and its progress in [0, 1]."""

    def __init__(self, cfg: TrainConfig, tokens_per_step: int, step: int = 0, tokens: int = 0) -> None:
        """`step` steps and `tokens` tokens are done already (a resumed run: its batch may have changed since)."""
        by_tokens = step + math.ceil(max(0, cfg.max_tokens - tokens) / tokens_per_step) if cfg.max_tokens else None
        self.max_steps = min((x for x in (cfg.max_iters, by_tokens) if x is not None), default=None)
        if by_tokens is not None and self.max_steps < by_tokens:
            log.warning("train.max_iters (%d) ends the run before train.max_tokens (%d tokens, at step %d); pass "
                        "--train.max_iters null to train to the token budget", self.max_steps, cfg.max_tokens,
                        by_tokens)
        self.max_time = cfg.max_time
        self.warmup = cfg.warmup_iters
        if self.max_steps is not None and self.warmup >= self.max_steps:  # the schedule would never leave warmup
            log.warning("train.warmup_iters (%d) is not shorter than the run (%d steps): the learning rate only "
                        "warms up, ending at %.3g of its peak, and never decays; pass a smaller --train.warmup_iters",
                        self.warmup, self.max_steps, self.max_steps / self.warmup)

    def progress(self, step: int, elapsed: float) -> float:
        """How far the run is through its budget after warmup: 0 when warmup ends, 1 at the budget's end. For a
        time budget the warmup's seconds are estimated at the mean step time so far (only the end must be exact)."""
        p = 0.0
        if self.max_steps is not None:
            p = (step - self.warmup) / max(1, self.max_steps - self.warmup)
        if self.max_time is not None:
            warm = elapsed * min(self.warmup, step) / step if step else 0.0
            p = max(p, (elapsed - warm) / (self.max_time - warm) if self.max_time > warm else 1.0)
        return p

    def progress_after(self, step: int, elapsed: float) -> float:
        """The progress at the end of the step about to run (`step` steps done, `elapsed` seconds spent), its time
        estimated by the mean step time so far: the schedule's last step gets progress 1, whatever the throughput."""
        return self.progress(step + 1, elapsed + (elapsed / step if step else 0.0))

    def done(self, step: int, elapsed: float) -> bool:
        return (self.max_steps is not None and step >= self.max_steps) or \
            (self.max_time is not None and elapsed >= self.max_time)


FREE_IN_FINE_TUNING = ("dropout", "block_size")
"""The model fields a fine-tune may set otherwise than the run it starts from: every other one changes a weight's
shape or what the weights compute (a rope_theta, a norm's eps)."""


def _init_checkpoint(init_from: str, data: PreparedData, model_config: ModelConfig) -> Path:
    """The checkpoint a fine-tune starts from, checked against what it is trained with: the data's tokenizer must
    be the run's, and the model config the run's but for FREE_IN_FINE_TUNING (load_weights checks the shapes, as
    a learned position table's, later)."""
    from .api import read_run_config  # the API layer sits above the trainer

    _, theirs = read_run_config(init_from)
    folder = latest_checkpoint(Path(init_from))
    if folder is None:
        raise CheckpointError(f"train.init_from {init_from} has no checkpoint yet; train it first")
    if load_tokenizer(Path(init_from) / "tokenizer.json").to_dict() != data.tokenizer.to_dict():
        raise ConfigError(f"the data is tokenized otherwise than train.init_from {init_from}'s tokenizer; give raw "
                          "text (tlm train tokenizes it with the run's own) or data prepared with it")
    ours, base = model_config.to_dict(), theirs.to_dict()
    changed = [f"{k} {base[k]!r} -> {ours[k]!r}" for k in base if k not in FREE_IN_FINE_TUNING and ours[k] != base[k]]
    if changed:
        raise ConfigError(f"a fine-tune keeps the model of train.init_from {init_from}; these fields differ: "
                          f"{', '.join(changed)} (drop the --model.* that set them; only "
                          f"{' and '.join(FREE_IN_FINE_TUNING)} may change)")
    return folder


def check_settings(model_config: ModelConfig, cfg: TrainConfig) -> None:
    """Refuse training settings the model cannot take, before any data is prepared: activation checkpointing of a
    recurrent model, which has no blocks to recompute, was refused only once the corpus had been tokenized."""
    if cfg.activation_checkpointing and model_config.arch != "transformer":
        raise ConfigError(f"train.activation_checkpointing recomputes Transformer blocks; an {model_config.arch} "
                          "model has none: drop the option")
    if cfg.lora_rank and model_config.arch != "transformer":
        raise ConfigError(f"train.lora_rank adapts the linear layers of Transformer blocks; fine-tune an "
                          f"{model_config.arch} model whole (drop lora_rank)")


def check_resumable(run_dir: str | Path) -> None:
    """Raise CheckpointError unless `run_dir` holds a checkpoint to resume from."""
    if latest_checkpoint(Path(run_dir)) is None:
        raise CheckpointError(f"--resume given but {run_dir} has no checkpoint; drop --resume to start a new run")


def prepare_run_dir(run_dir: Path, config: dict[str, Any], data: PreparedData, resume: bool, overwrite: bool) -> bool:
    """Validate what is already in `run_dir`; return True when there is a checkpoint to resume from.

    A folder holding another run is refused unless --resume (same model config required) or --overwrite (see
    check_out: never a folder that holds the data, or one tlm did not write).
    """
    saved = run_dir / "config.json"
    if resume:
        check_resumable(run_dir)
        if load_tokenizer(run_dir / "tokenizer.json").to_dict() != data.tokenizer.to_dict():
            raise CheckpointError(f"the data's tokenizer differs from the one {run_dir} was trained with; resume on "
                                  "the same data (or pass the folder made by `tlm prepare` for it)")
        old = json.loads(saved.read_text())
        old_model = ModelConfig.from_dict(old.get("model", {})).to_dict()  # fields added since: their defaults
        if old_model != config["model"]:
            diff = sorted(k for k in config["model"] if old_model.get(k) != config["model"][k])
            raise CheckpointError(f"checkpoint in {run_dir} was trained with a different model config (fields {diff});"
                                  " resume with the same config or start a new run with --overwrite")
        return True
    sources = [s["path"] for s in data.manifest.get("sources", [])]
    check_out(run_dir, overwrite, [data.path, *sources], resumable=True)  # emptied only once the new run is set up
    return False


@contextmanager
def stop_on_sigint():
    """Turn the first Ctrl-C into a flag the loop checks between steps (so the checkpoint is of a completed step);
    a second Ctrl-C interrupts at once."""
    flag = {"stop": False}

    def handler(signum, frame):  # noqa: ARG001
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def train(model_config: ModelConfig, cfg: TrainConfig, data: PreparedData, run_dir: str | Path,
          resume: bool = False, overwrite: bool = False, progress: bool = True,
          extra_config: dict[str, Any] | None = None, stop_at: int | None = None) -> TrainResult:
    """Train a model on prepared data into `run_dir`. `model_config.vocab_size` is set from the tokenizer.

    `stop_at` pauses the run after that step exactly as Ctrl-C does (checkpoint, `interrupted=True`) while the
    schedule still targets the whole budget: a run trained in segments with `resume` equals one trained at once.

    Started by torchrun (WORLD_SIZE > 1), each process trains its share of every batch (see `parallel`), joined as
    `cfg.parallel` says; rank 0 alone writes the run folder and shows progress."""
    info = dist_from_env()
    check_settings(model_config, cfg)
    check_batch(cfg.batch_size, info)  # before any process group exists: every rank fails the same way
    device = device_for(info, cfg.device)
    with distributed(info, device, cfg.dist_timeout):
        return _train(model_config, cfg, data, Path(run_dir), resume, overwrite, progress, extra_config, stop_at,
                      info, device)


def _train(model_config: ModelConfig, cfg: TrainConfig, data: PreparedData, run_dir: Path, resume: bool,
           overwrite: bool, progress: bool, extra_config: dict[str, Any] | None, stop_at: int | None,
           info: DistInfo, device: torch.device) -> TrainResult:
    if data.pairs and not cfg.init_from:
        raise ConfigError("preference pairs train by DPO, against the model the run starts from: give it, "
                          "--train.init_from RUN (one fine-tuned on such prompts first, as DPO expects)")
    # the base a fine-tune starts from (LoRA's also when it resumes: its checkpoints hold the adapters, not the base;
    # DPO's too: it is the reference)
    init = _init_checkpoint(cfg.init_from, data, model_config) \
        if cfg.init_from and (not resume or cfg.lora_rank or data.pairs) else None
    if not cfg.init_from:  # a fine-tune keeps its model's table, which may be padded past the tokenizer's ids
        model_config = ModelConfig.from_dict({**model_config.to_dict(), "vocab_size": data.tokenizer.vocab_size})
    if info.is_main:
        warn_unused_fields(model_config)
    config = {"model": model_config.to_dict(), "train": json.loads(dump_json(cfg)), **(extra_config or {})}
    resuming = on_main(prepare_run_dir, info, run_dir, config, data, resume, overwrite)
    amp_dtype = autocast_dtype(device, cfg.dtype)
    sharded = info.enabled and cfg.parallel == "fsdp"
    if sharded and amp_dtype == torch.float16:
        raise ConfigError("train.parallel=fsdp does not support float16 loss scaling; use --train.dtype bfloat16")
    if sharded and model_config.arch != "transformer":
        raise ConfigError(f"train.parallel=fsdp shards the model per Transformer block; train {model_config.arch} "
                          "models with --train.parallel ddp")
    if sharded and cfg.optimizer == "muon":
        raise ConfigError("train.optimizer=muon needs whole weight matrices; use --train.parallel ddp with muon")
    if sharded and cfg.lora_rank:
        raise ConfigError("LoRA fine-tunes run under --train.parallel ddp (its frozen weights are not sharded)")
    if sharded and data.pairs:
        raise ConfigError("DPO runs under --train.parallel ddp (its reference model is not sharded)")
    check_memory(model_config, cfg, info, device, amp_dtype, data.pairs)
    # for MFU: a datasheet figure, or a matmul timed now; of float32 for a CPU LSTM, whose recurrence runs in it
    # under any autocast (against this CPU's bf16 peak, a bf16 run's MFU read 475 %)
    peak = peak_flops(device, torch.float32 if runs_in_float32(model_config, device) else amp_dtype)
    torch.manual_seed(cfg.seed)
    # QLoRA's float base is staged in host memory, quantized there, and only then moved to the device
    staged = torch.device("cpu") if cfg.lora_quantize is not None else device
    model = build_model(model_config).to(staged).init_weights(cfg.seed)
    folder = latest_checkpoint(run_dir) if resuming else None
    if cfg.lora_rank:  # the base's weights, frozen, under new adapters (a resumed run's are loaded below)
        load_weights(model, init)
        if cfg.lora_quantize is not None:  # QLoRA: the same levels on every (re)start, so resuming stays exact
            spec = parse_quantize(cfg.lora_quantize)
            quantize_base(model, spec["bits"], spec["group_size"])
            model.to(device)
        trained = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        if amp_dtype != torch.float32:
            hold_base_in(model, amp_dtype)
        if info.is_main:
            log.info("LoRA rank %d: training %s of %s parameters", cfg.lora_rank, f"{trained:,}",
                     f"{sum(p.numel() for p in model.parameters()):,}")
    elif folder is not None and not is_sharded(folder):
        load_weights(model, folder)  # whole weights, before any sharding
    elif folder is None and init is not None:
        load_weights(model, init)  # a fine-tune's start (cast to the model's float32 parameters)
    if cfg.neftune_alpha:
        _noisy_embeddings(model, cfg.neftune_alpha)
    dpo = None
    if data.pairs:  # LoRA's reference is the model with its adapters off; a full fine-tune's, its starting weights
        reference = None if cfg.lora_rank else build_model(model_config).to(device)
        if reference is not None:
            load_weights(reference, init)
        dpo = DPO(model, cfg.dpo_beta, reference, cfg.dpo_loss, cfg.dpo_label_smoothing, cfg.dpo_nll_weight)
    forward = parallelize(model, info, cfg)  # FSDP2 shards `model` in place: the optimizer comes after
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if dpo is not None:
        sampler = PairSampler(data.train, data.train_mask, data.train_starts, cfg.batch_size, model_config.block_size,
                              cfg.seed, info.rank, info.world_size, model_config.vocab_size)
    else:
        sampler = BatchSampler(data.train, cfg.batch_size, model_config.block_size, seed=cfg.seed, rank=info.rank,
                               world_size=info.world_size, vocab_size=model_config.vocab_size, mask=data.train_mask,
                               starts=data.train_starts)
    # examples packed into a Transformer's windows are kept apart (windows.BatchSampler.layout); a recurrent model's
    # state runs on through them, as through text
    packed = data.train_starts is not None and model_config.arch == "transformer" and dpo is None
    if data.train_starts is not None and info.is_main:
        warn_long_examples(data.train_starts, len(data.train), model_config.block_size, cut=dpo is not None)
    # a step's tokens: its windows', full; of pairs (padded rows), their mean length's, the budgets' estimate
    tokens_per_step = cfg.batch_size * cfg.grad_accum * (model_config.block_size if dpo is None else
                                                         round(sampler.tokens_per_pair()))
    per_token = flops_per_token(model_config)
    flops_per_step = (per_token["train"] + (per_token["forward"] if dpo else 0)) * tokens_per_step / info.world_size
    step, elapsed, tokens = 0, 0.0, 0
    metrics_path = run_dir / "metrics.jsonl"

    if folder is not None:
        state = load_state(folder)
        missing = sorted({"step", "sampler", "scaler", "rng", *(() if is_sharded(folder) else ("optimizer",)),
                          *(("lora",) if cfg.lora_rank else ())} - set(state))
        if missing:
            raise CheckpointError(f"training state {folder / 'state.pt'} lacks {missing}: not a checkpoint tlm "
                                  "train wrote, or a damaged one; resume from an intact copy of the run folder")
        if cfg.lora_rank:
            load_adapters(model, state["lora"])
        with config_hyperparameters(optimizer):
            if is_sharded(folder):  # weights and optimizer resharded to this run's layout, whatever the saving one's
                load_shards(folder, model, optimizer)
            else:
                load_optimizer_state(optimizer, state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        step, elapsed = state["step"], state["elapsed"]
        tokens = state.get("tokens", step * tokens_per_step)
        if info.is_main:
            _truncate_metrics(metrics_path, step)  # drop lines logged after the checkpoint by the interrupted run
            # the settings this run continues with (flags may have changed them): what the next --resume takes
            atomic_write_text(run_dir / "config.json", dump_json({**json.loads((run_dir / "config.json").read_text()),
                                                                  **config}))
        log.info("resumed %s at step %d", run_dir, step)
    elif info.is_main:
        clear_out(run_dir)  # an old run replaced with --overwrite goes only now that the new one is set up
        atomic_write_text(run_dir / "config.json", dump_json(config))
        save_tokenizer(data.tokenizer, run_dir / "tokenizer.json")
        template = data.chat_template or (read_chat_template(cfg.init_from) if cfg.init_from else None)
        if template is not None:  # a fine-tuned chat model chats as it did, or as its conversations were written
            atomic_write_text(run_dir / CHAT_TEMPLATE_FILE, template)
        atomic_write_text(run_dir / "env.json", json.dumps(environment(), indent=2))

    budget = Budget(cfg, tokens_per_step, step, tokens)
    ctx = autocast(device, amp_dtype)
    eval_batches = cfg.eval_batches * cfg.grad_accum  # of micro-batches: the same val tokens however a batch is split
    bytes_per_token = None if dpo else _eval_bytes_per_token(data, cfg.batch_size, model_config.block_size,
                                                             eval_batches)

    def checkpoint() -> None:
        """FSDP2: every rank writes its shards of weights and optimizer state in parallel (no gathering onto one
        rank), into a temporary folder that rank 0 commits. DDP and one process: rank 0 writes the whole weights and
        optimizer state (replicated on every rank anyway) in the single-file format."""
        state = {"step": step, "elapsed": elapsed, "tokens": tokens,
                 "sampler": sampler.state_dict(), "scaler": scaler.state_dict(),
                 "rng": {"cpu": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
        if sharded:
            tmp = on_main(begin_checkpoint, info, run_dir, step)
            if tmp is not None:
                save_shards(tmp, model, optimizer)
                on_main(commit_checkpoint, info, run_dir, tmp, step, state)
        elif info.is_main:  # (LoRA: the weights merged, the adapters in the state)
            lora = {"lora": adapters(model)} if cfg.lora_rank else {}
            save_checkpoint(run_dir, model, {**state, "optimizer": optimizer.state_dict(), **lora}, step)

    def evaluate() -> EvalResult | PreferenceResult:  # every rank runs the same one (FSDP2: all ranks for a forward)
        if dpo is not None:
            result = dpo.evaluate(data.val, data.val_mask, data.val_starts, cfg.batch_size, model_config.block_size,
                                  eval_batches, ctx)
        else:
            result = evaluate_tokens(model, data.val, bytes_per_token, cfg.batch_size, eval_batches, ctx,
                                     data.val_mask, data.val_starts)
        if info.is_main:
            _append_metrics(metrics_path, {"step": step, "tokens": tokens, "elapsed": round(elapsed, 3),
                                           **{f"val_{k}": v for k, v in result.to_dict().items()}})
        return result

    val: EvalResult | PreferenceResult | None = None
    interrupted = False
    total = budget.max_steps
    bar = tqdm(total=total, initial=step, disable=not (progress and info.is_main) or None, dynamic_ncols=True,
               unit="step", desc=run_dir.name)
    model.train()
    with stop_on_sigint() as sigint:
        while not budget.done(step, elapsed):
            t0 = time.perf_counter()
            lr = lr_at(step, budget.progress_after(step, elapsed), cfg)
            set_lr(optimizer, lr)
            loss_sum = 0.0
            pair_stats = torch.zeros(5)  # DPO: sums over this rank's pairs of the step (DPO.loss)
            batches = [(*sampler.next(), sampler.targets, sampler.layout if packed else {})
                       for _ in range(cfg.grad_accum)]
            targets = sum(n for _, _, n, _ in batches)  # of the whole step, all ranks (the same count on each)
            for micro, (x, y, _, layout) in enumerate(batches):
                # each micro-batch's mean loss weighted by its share of the step's targets (times the ranks, which
                # DDP averages over): every target of the step counts alike, also where masked ones (conversations'
                # context) leave the rows and micro-batches unequal; 1 / grad_accum when every token is a target.
                # DPO's targets are pairs, two rows each
                weight = (len(x) // 2 if dpo else int((y >= 0).sum())) * info.world_size / targets
                with gradient_sync(forward, micro == cfg.grad_accum - 1):  # reduce gradients once per step
                    if dpo is not None:
                        loss, stats = dpo.loss(forward, x.to(device), y.to(device), ctx)
                        pair_stats += stats.float().cpu()
                    else:
                        with ctx:
                            loss = forward(x.to(device), y.to(device),
                                           **{k: v.to(device) for k, v in layout.items()}).loss
                    scaler.scale(loss * weight).backward()
                loss_sum += loss.item() * weight
            scaler.unscale_(optimizer)
            grad_norm = clip_grad_norm(model, cfg.grad_clip or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += tokens_per_step
            # ranks agree on the loss (global mean), the clock (so time budgets end together) and Ctrl-C
            pair_means = (pair_stats[1:] * info.world_size / targets).tolist() if dpo else []
            train_loss, dt, stop, *pair_means = mean_over_ranks([loss_sum, time.perf_counter() - t0,
                                                                 float(sigint["stop"]), *pair_means], info)
            stop = stop > 0
            rewards = dict(zip(("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"), pair_means))
            _check_finite(train_loss, None if scaler.is_enabled() else float(grad_norm), step, lr)
            elapsed += dt
            bar.update(1)
            step_mfu = mfu(flops_per_step, 1 / dt, peak)
            bar.set_postfix(loss=f"{train_loss:.4f}", **({"acc": f"{rewards['reward_accuracy']:.0%}"} if dpo else {}),
                            tok_s=f"{tokens_per_step / dt:,.0f}", mfu=f"{step_mfu:.1%}", refresh=False)
            finished = budget.done(step, elapsed)
            if info.is_main and (step % cfg.log_interval == 0 or step == 1 or finished):  # the last too
                _append_metrics(metrics_path, {"step": step, "tokens": tokens, "loss": train_loss, **rewards,
                                               "lr": lr, "grad_norm": float(grad_norm),
                                               "tokens_per_s": tokens_per_step / dt, "mfu": step_mfu,
                                               "elapsed": round(elapsed, 3)})
            if step % cfg.eval_interval == 0 or finished:
                val = evaluate()
                if info.is_main:
                    bar.write(f"step {step}: val {val.summary()}")
                checkpoint()
            elif stop or step == stop_at:
                checkpoint()
            if (stop or step == stop_at) and not finished:  # a Ctrl-C in the last step: the run is complete
                interrupted = True
                break
    bar.close()
    if info.is_main and not interrupted and cfg.max_time is not None and elapsed < cfg.max_time and \
            cfg.max_tokens is None and cfg.max_iters is not None and step >= cfg.max_iters:
        log.warning("train.max_iters (%d) ended the run after %.0f s of its %.0f s budget (train.max_time); pass "
                    "--train.max_iters null to train for the whole time", cfg.max_iters, elapsed, cfg.max_time)
    if not interrupted and info.is_main:
        plot_losses(metrics_path, run_dir / "loss.png")
    return TrainResult(run_dir, step, tokens, elapsed, val, interrupted, info.is_main)


def check_memory(model_config: ModelConfig, cfg: TrainConfig, info: DistInfo, device: torch.device,
                 amp_dtype: torch.dtype, pairs: bool = False) -> None:
    """Refuse, before anything is built, a run whose memory plan (`tlm memory`'s, within 5-15 % of the measured peak)
    exceeds the free memory: on a Linux host a batch too large is granted (overcommit), and the first step then ends
    in an allocator error or the OOM killer's unannounced kill. The processes torchrun starts on one host share its
    memory. DPO (`pairs`) computes two rows a pair with their logits (the plan's fused loss holds none: about 16
    bytes a logit here, float32 copy, log-softmax and gradients) and, fine-tuning every weight, holds the reference's
    float32 weights too."""
    if model_config.arch != "transformer":
        return  # the plan models Transformer blocks; a recurrent baseline is small
    from .experiments.memory import plan_memory

    sharded = info.enabled and cfg.parallel == "fsdp"
    rows = cfg.batch_size // info.world_size * (2 if pairs else 1)
    plan = plan_memory(model_config, rows, world_size=info.world_size,
                       parallel="fsdp" if sharded else "ddp", dtype=str(amp_dtype).removeprefix("torch."),
                       activation_checkpointing=cfg.activation_checkpointing,
                       fused_optimizer=fused_adamw(device) and not sharded,
                       trained=lora_params(model_config, cfg.lora_rank, cfg.lora_targets) if cfg.lora_rank else None,
                       base_bytes=base_bytes(model_config, cfg.lora_quantize, amp_dtype) if cfg.lora_rank else None)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if info.enabled and device.type == "cpu" else 1
    who = f"{local} processes of " if local > 1 else ""
    dpo = 16 * rows * model_config.block_size * model_config.vocab_size + \
        (0 if cfg.lora_rank else 4 * count_params(model_config).total) if pairs else 0
    check_fits((plan.peak + dpo) * local, device, f"training {who}{cfg.batch_size // info.world_size} sequences of "
               f"{model_config.block_size} tokens at a time (the memory plan of `tlm memory`)",
               "lower --train.batch_size (--train.grad_accum keeps the tokens per step) or set "
               "--train.activation_checkpointing true")


def _noisy_embeddings(model: nn.Module, alpha: float) -> None:
    """NEFTune (train.neftune_alpha): a forward hook on the token embedding that, in training mode, adds uniform noise
    of magnitude alpha / sqrt(T · C) to its (B, T, C) output. Drawn from torch's generator, which checkpoints save,
    so a resumed run draws the same noise."""
    def add_noise(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        bound = alpha / math.sqrt(out.size(-2) * out.size(-1))
        return out + torch.empty_like(out).uniform_(-bound, bound)

    model.tok_emb.register_forward_hook(add_noise)


def _check_finite(loss: float, grad_norm: float | None, step: int, lr: float) -> None:
    """Stop a diverged run at once: past a NaN or infinite loss, or gradient norm (None under float16, whose loss
    scaler skips such steps), the weights are NaN too, and carrying on to the next evaluation would save them over
    the last good checkpoint and report the run as finished."""
    bad = [f"{name} became {value}" for name, value in (("loss", loss), ("gradient norm", grad_norm))
           if value is not None and not math.isfinite(value)]
    if bad:
        raise DivergenceError(f"the training {' and '.join(bad)} at step {step} (lr {lr:.3g}): the run diverged "
                              "and stopped without saving these weights; resume from its last checkpoint, if it has "
                              "one (--resume true), with a lower --train.lr, a longer --train.warmup_iters or "
                              "--train.grad_clip")


def _eval_bytes_per_token(data: PreparedData, batch_size: int, block_size: int, max_batches: int) -> float:
    """UTF-8 bytes per token predicted by an evaluation, for its bits per byte: the split's own ratio when it covers
    the whole split, else that of the tokens it covers (the split's start), whose ratio may be another (an ASCII
    start, multibyte text later)."""
    if data.val_mask is not None:  # conversations: the bytes of the assistant's tokens scored
        scored = [y[y >= 0] for _, y in iter_eval_batches(data.val, batch_size, block_size, max_batches,
                                                           data.val_mask, data.val_starts)]
        return data.tokenizer.num_bytes(torch.cat(scored).tolist()) / max(1, sum(map(len, scored)))
    n = sum(y.numel() for _, y in iter_eval_batches(data.val, batch_size, block_size, max_batches))
    if n >= len(data.val) - 1:
        return predicted_bytes_per_token(data.tokenizer, data.val, data.manifest["val_bytes"])
    return data.tokenizer.num_bytes(data.val[1 : n + 1].tolist()) / n


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps up to `step` (the checkpoint resumed); a last line cut short by a kill goes too."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        try:
            json.loads(lines[-1] if lines else "{}")
        except ValueError:
            lines.pop()
        lines = [ln for ln in lines if json.loads(ln)["step"] <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in lines))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, without a last line cut short by a kill (the trainer drops it on resume);
    ValueError for any other line that is not a JSON object."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    records = []
    for i, ln in enumerate(lines):
        try:
            records.append(json.loads(ln))
        except ValueError:
            if i < len(lines) - 1:
                raise
    if not all(isinstance(r, dict) for r in records):
        raise ValueError("a line holds JSON that is not an object")
    return records


def plot_losses(metrics_path: Path, out: Path) -> None:
    """Training and validation loss against step, as a PNG, drawn as the experiments' figures are (plotting.py):
    without pyplot, whose backend switch left a notebook that called train() unable to show its own plots."""
    from .experiments.plotting import figure, literal, save_png

    records = read_metrics(metrics_path)
    train_pts = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val_pts = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    if train_pts:
        ax.plot(*zip(*train_pts), label="train", linewidth=1)
    if val_pts:
        ax.plot(*zip(*val_pts), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(literal(out.parent.name))
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, out, dpi=120)
