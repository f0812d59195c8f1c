"""`tlm`: a thin command-line layer over the library. Parsers are generated from the config dataclasses (jsonargparse),
so `--help` lists every field with its default and docstring, YAML configs load with `--config`, and any field is
overridable on the command line. Library errors become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

from . import accounting
from .cli_args import add_tokenizer_args, config_from
from .cli_experiments import (
    add_experiment_parsers,
    add_experiment_subcommands,
    cmd_attention,
    cmd_experiment,
    cmd_plan,
    cmd_report,
)
from .cli_interop import add_interop_parsers, cmd_convert, cmd_export
from .cli_sampling import (
    QUANTIZE_HELP,
    add_chat_parser,
    add_serve_parser,
    cmd_chat,
    cmd_serve,
    load_for_sampling,
    read_template_file,
    sampling_parser,
)
from .config import ModelConfig, SampleConfig, TrainConfig, preset, preset_recipe, presets
from .errors import ConfigError, DataError, TLMError

log = logging.getLogger("transformer_lm")


def build_parser() -> tuple[ArgumentParser, dict[str, ArgumentParser]]:
    # the config fields' docstrings become the option descriptions of --help
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="tlm", exit_on_error=False, description="Train, sample and evaluate Transformer "
                            "language models.")
    sub = parser.add_subcommands(dest="command")
    cmds: dict[str, ArgumentParser] = {}

    p = cmds["prepare"] = ArgumentParser(exit_on_error=False, description="Tokenize text into train/val token files.")
    p.add_argument("sources", type=str, nargs="+", help="Text files, folders or glob patterns.")
    p.add_argument("--out", type=str, required=True, help="Output folder for train.bin, val.bin and manifest.json.")
    add_tokenizer_args(p)
    p.add_argument("--val_fraction", type=float, default=0.1, help="Fraction of the text held out for validation.")
    p.add_argument("--workers", type=int | None, default=None,
                   help="Tokenizer processes (default: all cores); never more than one per 2^20 characters of text.")
    p.add_argument("--tokenizer_from", type=str | None, default=None, help="A run folder whose tokenizer to use "
                   "(a fine-tune's data: that of --train.init_from's run), instead of --tokenizer.")
    p.add_argument("--chat_template", type=str | None, default=None, help="Conversations (one .jsonl file): the chat "
                   "template to render them in (default: --tokenizer_from's run's).")
    p.add_argument("--overwrite", type=bool, default=False, help="Replace the prepared data already in --out.")

    p = cmds["train"] = ArgumentParser(exit_on_error=False, description="Train a model (default data: the Python "
                                       "standard library's source, so it works offline).")
    p.add_argument("--config", action=ActionConfigFile, help="YAML/JSON file of options (fields as below).")
    # SUPPRESS, not None: an absent positional's default would replace the `data:` of a --config file
    p.add_argument("data", type=str | None, nargs="?", default=argparse.SUPPRESS,
                   help="Text file, folder, glob, or a folder made by `tlm prepare` (default: this Python's standard "
                        "library source); or conversations, a .jsonl file of {\"messages\": [...]} lines, whose "
                        "replies are learned (see --chat_template).")
    p.add_argument("--out", type=str, default="runs/default", help="Run folder for checkpoints, metrics and plots.")
    p.add_argument("--preset", type=str | None, default="tiny",
                   help="Model preset applied before --model.* overrides (a recipe preset, like shakespeare-speedrun, "
                   f"also sets --train.* defaults): {', '.join(presets())}.")
    p.add_class_arguments(ModelConfig, "model", instantiate=False)
    p.add_class_arguments(TrainConfig, "train", instantiate=False)
    add_tokenizer_args(p, prepared_too=True)
    p.add_argument("--chat_template", type=str | None, default=None, help="Conversations (a .jsonl file): the Jinja "
                   "chat template to render them in (default: that of --train.init_from's run); the run keeps it.")
    p.add_argument("--resume", type=bool, default=False, help="Continue the run in --out from its last checkpoint.")
    p.add_argument("--overwrite", type=bool, default=False, help="Replace a different run already in --out.")

    p = cmds["sample"] = sampling_parser("Generate text from a trained run.")
    p.add_argument("prompt", type=str | None, nargs="?", default=None,
                   help="Prompt text (default: read standard input when it is not a terminal, else empty).")
    p.add_argument("--verbose", type=bool, default=False,
                   help="After each sample, print prefill and decode tokens/s and the decode's MBU (memory "
                   "bandwidth utilization: bytes read per token × tokens/s ÷ measured copy bandwidth) to stderr. "
                   "N new tokens take N-1 decode forwards (the first is drawn from the prefill's logits).")

    add_chat_parser(cmds)
    add_serve_parser(cmds)

    p = cmds["eval"] = ArgumentParser(exit_on_error=False, description="Loss, perplexity and bits per byte on text.")
    p.add_argument("run", type=str, help="Run folder.")
    p.add_argument("--data", type=str, required=True, help="Text file, folder or glob to evaluate on (tokenized as "
                   "`tlm prepare` does), or a folder `tlm prepare` wrote with the run's tokenizer (its val split); "
                   "of conversations (.jsonl, in the run's chat template), the assistant's replies are scored; of "
                   "preference pairs, DPO's loss and reward accuracy against --reference.")
    p.add_argument("--reference", type=str | None, default=None, help="Preference pairs: the run whose model the "
                   "rewards are measured from (default: the one the run was fine-tuned from, train.init_from).")
    p.add_argument("--batch_size", type=int, default=8, help="Windows per forward pass.")
    p.add_argument("--json", type=bool, default=False, help="Print machine-readable JSON.")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:N or mps.")
    p.add_argument("--quantize", type=str | None, default=None, help=QUANTIZE_HELP)

    p = cmds["info"] = ArgumentParser(exit_on_error=False, description="Parameters, FLOPs and memory of a model.")
    p.add_argument("run", type=str | None, nargs="?", default=None, help="Run folder (default: use --preset).")
    p.add_argument("--preset", type=str | None, default="tiny", help=f"Model preset: {', '.join(presets())}.")
    p.add_class_arguments(ModelConfig, "model", instantiate=False)
    p.add_argument("--json", type=bool, default=False, help="Print machine-readable JSON.")
    add_experiment_parsers(cmds)
    add_interop_parsers(cmds)
    _add_bench_parser(cmds)
    _add_scaling_parsers(cmds)

    for name, p in cmds.items():
        sub.add_subcommand(name, p, help=p.description)
    add_experiment_subcommands(cmds["experiment"])  # nested subcommands go in after their parent
    return parser, cmds


def parse(argv: list[str]) -> Namespace:
    """Parse twice when a preset is named or a run resumed: the preset's fields (and a recipe preset's training
    settings), then a resumed run's own saved model and training config, become the defaults that --model.* and
    --train.* override, whatever the order on the command line or in --config. The first pass leaves out
    --print_config and --help, which would print (and exit) before those defaults are in."""
    parser, cmds = build_parser()
    late = [a for a in argv if a.startswith("--print_config") or a in ("-h", "--help")]  # printed after the defaults
    first = [a for a in argv if a not in late]
    try:
        ns = parser.parse_args(first)
    except argparse.ArgumentError:
        if late:  # `tlm sample --help` lacks its positional: the help is what was asked for
            parser.parse_args(argv)
        raise
    cmd = ns.command
    defaults: dict[str, Any] = {}
    chosen = ns[cmd].get("preset")
    if chosen and cmd in ("train", "info", "plan", "memory"):
        defaults |= {f"model.{k}": v for k, v in preset(chosen).items()}
        if cmd == "train":
            defaults |= {f"train.{k}": v for k, v in preset_recipe(chosen).items()}
    if cmd == "train" and ns.train.resume:
        # The run's own settings, over the preset's. The model fields of a preset named (on the command line or in
        # --config) go over them, so that one of another model is refused by train's config check instead of
        # silently ignored; its training recipe does not: the run continues with its own.
        cmds["train"].set_defaults({"preset": None})
        named = parser.parse_args(first).train.preset is not None
        cmds["train"].set_defaults({"preset": chosen})
        defaults = _saved_settings(Path(ns.train.out))
        if named:
            defaults |= {f"model.{k}": v for k, v in preset(chosen).items()}
    elif cmd == "train" and ns.train.train.init_from:  # a fine-tune: the run's model over the preset's, and
        base = _saved_settings(Path(ns.train.train.init_from))  # --model.* over that (train checks what changed)
        defaults |= {k: v for k, v in base.items() if k.startswith("model.")}
    if defaults or late:
        cmds[cmd].set_defaults(defaults)
        ns = parser.parse_args(argv)
    return ns


def _saved_settings(run: Path) -> dict[str, Any]:
    """A run's saved model and training config as parser defaults (fields this version no longer has dropped), so
    that `--resume true` continues the run as it was started, to the end of its own budget."""
    try:
        saved = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return {}  # no run there: train()'s checks say so
    out = {}
    for key, cls in (("model", ModelConfig), ("train", TrainConfig)):
        known = {f.name for f in dataclasses.fields(cls)}
        section = saved.get(key) if isinstance(saved, dict) else None
        out |= {f"{key}.{k}": v for k, v in (section or {}).items() if k in known}
    if isinstance(saved, dict) and isinstance(saved.get("preset"), str | None):
        out["preset"] = saved.get("preset")  # recorded again as it was, not as the default "tiny"
    from .tokenizers import TOKENIZER_KINDS

    data = saved.get("data") if isinstance(saved, dict) else None
    if isinstance(data, dict) and data.get("tokenizer") in TOKENIZER_KINDS:  # raw text prepared again (an emptied
        out["tokenizer"] = data["tokenizer"]  # cache) the way it was: the same kind, bpe size and GPT-2 files
        out |= {k: data[k] for k in ("vocab_size", "gpt2_dir") if data.get(k) is not None}
    return out


def cmd_prepare(a: Namespace) -> None:
    from .chat import read_chat_template
    from .chat_data import chat_tokenizer, example_files, prepare_chats
    from .data import prepare, read_sources, resolve_sources
    from .tokenizers import build_tokenizer, load_tokenizer

    given = None
    if a.tokenizer_from is not None:
        from .api import read_run_config

        read_run_config(a.tokenizer_from)  # not a run folder: said so (a Hugging Face one: convert it first)
        given = load_tokenizer(Path(a.tokenizer_from) / "tokenizer.json")
    if (files := example_files(a.sources)) is not None:
        template = read_template_file(a.chat_template) if a.chat_template else \
            read_chat_template(a.tokenizer_from) if a.tokenizer_from else None
        tok = chat_tokenizer(given, a.tokenizer)
        m = prepare_chats(files, a.out, tok, template, a.val_fraction, a.overwrite)
        per, what = (2, "preference pairs") if m.get("pairs") else (1, "examples")
        print(f"{a.out}: {m['train_conversations'] // per:,} + {m['val_conversations'] // per:,} {what}, "
              f"{m['train_tokens']:,} train + {m['val_tokens']:,} val tokens ({m['train_learned_tokens']:,} + "
              f"{m['val_learned_tokens']:,} of them learned), {tok.kind} tokenizer")
        return
    if a.chat_template is not None:
        raise ConfigError("--chat_template applies to conversations (.jsonl files); drop it for text")
    sources = resolve_sources(a.sources)
    tok = given or build_tokenizer(a.tokenizer, read_sources(sources), a.vocab_size, a.gpt2_dir)
    m = prepare(sources, Path(a.out), tok, a.val_fraction, a.workers, a.overwrite)
    print(f"{a.out}: {m['train_tokens']:,} train + {m['val_tokens']:,} val tokens ({m['dtype']}), "
          f"{tok.kind} tokenizer with {tok.vocab_size:,} ids")


def cmd_train(a: Namespace) -> int:
    from .chat import read_chat_template
    from .chat_data import example_files
    from .parallel import dist_from_env
    from .runtime import resolve_device
    from .train import check_resumable, check_settings, train
    from .train_data import resumed_data, training_data

    for key in ("model", "train"):  # a --config file may set a section to null or a list
        if not isinstance(a.get(key), Namespace):
            raise ConfigError(f"{key}: in the config must be a mapping of {key} fields, got {a.get(key)!r}")
    if not isinstance(a.out, str) or not a.out:
        raise ConfigError(f"out must be a folder path, got {a.out!r}")
    if Path(a.out).exists() and not Path(a.out).is_dir():  # checked before minutes of preparing data
        raise ConfigError(f"--out {a.out} is a file; give a folder for the run")
    model_cfg = ModelConfig(**a.model.as_dict())
    train_cfg = TrainConfig(**a.train.as_dict())
    resolve_device(train_cfg.device)  # an unavailable device, before the data is prepared
    check_settings(model_cfg, train_cfg)  # and settings the model cannot take
    data_arg = a.get("data")
    source = os.path.abspath(data_arg) if data_arg else "python-stdlib"  # absolute: --resume may run elsewhere
    if a.resume:
        if not dist_from_env().enabled:  # torchrun: train() has rank 0 check it and say it once
            check_resumable(a.out)  # before minutes of preparing data for a folder with nothing to resume
        if data_arg is None:  # continue on the data the run was started with
            data_arg, source = resumed_data(a.out)
    tokenizer = a.tokenizer
    if train_cfg.init_from:  # the run's own tokenizer, or on resume the fine-tune's copy of it
        if a.tokenizer is not None and not a.resume:
            raise ConfigError(f"--tokenizer {a.tokenizer}: a fine-tune tokenizes its data with the tokenizer of "
                              f"train.init_from {train_cfg.init_from}; drop it")
        from .api import read_run_config
        from .tokenizers import load_tokenizer

        if not a.resume:
            read_run_config(train_cfg.init_from)  # not a run folder (a Hugging Face one: convert it first)
        tokenizer = load_tokenizer(Path(a.out if a.resume else train_cfg.init_from) / "tokenizer.json")
    template = read_template_file(a.chat_template) if a.chat_template else None
    if template is None and example_files(data_arg) is not None and (a.resume or train_cfg.init_from):
        template = read_chat_template(a.out if a.resume else train_cfg.init_from)  # the run's, or the one it keeps
    data = training_data(data_arg, tokenizer, a.vocab_size, a.gpt2_dir, template)
    kind = data.tokenizer.kind
    extra = {"data": {"source": source, "tokenizer": kind, "prepared": str(data.path),
                      "vocab_size": a.vocab_size if kind == "bpe" else None,
                      "gpt2_dir": os.path.abspath(a.gpt2_dir) if kind == "gpt2" and a.gpt2_dir else None},
             "preset": None if train_cfg.init_from else a.preset}
    res = train(model_cfg, train_cfg, data, a.out, resume=a.resume, overwrite=a.overwrite, extra_config=extra)
    if not res.is_main:  # under torchrun, rank 0 reports for all
        return 130 if res.interrupted else 0
    val = f", val {res.val.summary()}" if res.val else ""
    if res.interrupted:
        print(f"interrupted: checkpoint saved at step {res.step} in {res.run_dir}; continue with --resume true",
              file=sys.stderr)
        return 130
    print(f"{res.run_dir}: {res.step} steps, {res.tokens:,} tokens in {res.elapsed:.1f}s{val}")
    return 0


def cmd_sample(a: Namespace) -> None:
    from .decode import DecodeStats
    from .perf import decode_mbu

    prompt = a.prompt
    if prompt is None:
        try:
            prompt = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
            prompt.encode("utf-8")  # bytes a C locale's stdin let through as surrogates are not text either
        except UnicodeError:
            raise DataError("standard input is not UTF-8 text; convert it first (e.g. with iconv)") from None
    cfg = config_from(SampleConfig, a)
    if isinstance(sys.stdout, io.TextIOWrapper):  # a file or console in an encoding without some characters
        sys.stdout.reconfigure(errors="backslashreplace")  # (cp1252, latin-1): escaped, not a traceback mid-sample
    for stop in cfg.stop:  # only a double-quoted list item has its escapes read: '[\n]' and --stop+ '\n' do not
        if re.search(r"\\[ntr]", stop):
            log.warning("--stop item %r is a backslash and a letter, not a control character; for a newline write "
                        "--stop '[\"\\n\"]' (double quotes inside)", stop)
    if a.verbose and a.draft:
        log.warning("--verbose reports plain decoding's timings; with --draft there are none to report")
    run = load_for_sampling(a)
    cfg = run.sample_config(cfg)  # compile off where it does not apply (said once), so that the notes below agree
    stats = DecodeStats() if a.verbose and not a.draft else None
    run.tokenizer.encode(prompt)  # a prompt the tokenizer cannot encode fails before anything is printed
    for i, pieces in enumerate(run.stream_samples(prompt, cfg, stats)):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        first = next(pieces, "")  # prefill first: a warning about the prompt (cropped) comes before it, not mid-line
        sys.stdout.write(prompt + first)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if stats is not None and stats.new_tokens:
            sys.stdout.flush()
            line = f"prefill {stats.prompt_tokens} tokens at {stats.prefill_tokens_per_s:.1f} tokens/s"
            if stats.decode_steps:
                tps = stats.decode_tokens_per_s
                mbu = decode_mbu(run.model, tps, (stats.prompt_tokens + stats.context) // 2)
                line += (f"; decode {stats.new_tokens} tokens ({stats.decode_steps} forwards) at {tps:.1f} tokens/s, "
                         f"MBU {mbu:.0%}"
                         + (" (the first sample includes compiling)" if cfg.compile and i == 0 else ""))
            else:
                line += "; no decode step (the one new token is drawn from the prefill's logits)"
            print(line, file=sys.stderr)


def cmd_eval(a: Namespace) -> None:
    from .api import load_run
    from .preference import PreferenceResult
    from .quantize import parse_quantize

    run = load_run(a.run, a.device)
    if a.quantize:
        run.quantize(**parse_quantize(a.quantize))
    res = run.evaluate(a.data, a.batch_size, a.reference)
    if a.json:
        print(json.dumps(res.to_dict()))
    elif isinstance(res, PreferenceResult):
        print(f"{res.summary()}  ({res.pairs:,} pairs)")
    else:
        print(f"loss {res.loss:.4f}  perplexity {res.perplexity:.3f}  bits/byte {res.bpb:.4f}  ({res.tokens:,} tokens)")


def cmd_info(a: Namespace) -> None:
    from .recurrent import warn_unused_fields

    if a.run:
        from .api import read_run_config

        if a.preset != "tiny" or a.model.as_dict() != ModelConfig(**preset("tiny")).to_dict():  # not the defaults
            raise ConfigError("give either a run folder or a model (--preset / --model.*), not both: a run's "
                              "model is its own")

        cfg = read_run_config(a.run)[1]  # the config alone: no need to load the weights
    else:
        cfg = ModelConfig(**a.model.as_dict())
    warn_unused_fields(cfg)  # what the counts below leave out
    p = accounting.count_params(cfg)
    fl = accounting.flops_per_token(cfg)
    mem = accounting.training_memory(cfg)
    info: dict[str, Any] = {"config": cfg.to_dict(), "params": p.total, "non_embedding_params": p.non_embedding,
                            "flops_per_token": fl, "memory_bytes": mem}
    if a.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{'parameters':<28}{p.total:>18,}")
    print(f"{'  non-embedding':<28}{p.non_embedding:>18,}")
    print(f"{'  embedding tables':<28}{p.embedding:>18,}")
    context = f"context {cfg.block_size}" if cfg.arch == "transformer" else "no attention: any context"
    print(f"{'FLOPs/token forward':<28}{fl['forward']:>18,.0f}   ({context})")
    print(f"{'FLOPs/token training':<28}{fl['train']:>18,.0f}   (3x forward)")
    for k in ("weights", "gradients", "optimizer", "total"):  # as `tlm train` holds them, whatever a run stored
        print(f"{'memory ' + k + (' (AdamW)' if k == 'optimizer' else ''):<28}{_gib(mem[k]):>18}"
              + ("   (training state in fp32; activations not included)" if k == "weights" else ""))
    print("config: " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))


def _gib(n: int) -> str:
    return f"{n / 2**30:,.3f} GiB" if n >= 2**27 else f"{n / 2**20:,.2f} MiB"






# --- Scaling out (issue 5): `tlm consolidate` (sharded checkpoint → single file) and `tlm memory` (per-device plan).


def _add_scaling_parsers(cmds: dict[str, ArgumentParser]) -> None:
    p = cmds["consolidate"] = ArgumentParser(exit_on_error=False, description="Write a run's latest sharded "
                                             "checkpoint (FSDP2) as the single-file model.safetensors that every "
                                             "command and tool reads; one process, any world size it was saved at.")
    p.add_argument("run", type=str, help="Run folder.")

    p = cmds["memory"] = ArgumentParser(exit_on_error=False, description="Training memory per device of a model "
                                        "under DDP and FSDP2, with and without activation checkpointing: weights, "
                                        "gradients, AdamW state, activations and the peak.")
    p.add_argument("--preset", type=str | None, default="tiny",
                   help=f"Model preset applied before --model.* overrides: {', '.join(presets())}.")
    p.add_class_arguments(ModelConfig, "model", instantiate=False)
    p.add_argument("--batch_size", type=int, default=1,
                   help="Sequences per device and micro-step (train.batch_size / world size).")
    p.add_argument("--seq_len", type=int | None, default=None, help="Tokens per sequence (default: block_size).")
    p.add_argument("--world_size", type=int, default=8, help="Devices the run is spread over.")
    p.add_argument("--dtype", type=Literal["bfloat16", "float16", "float32"], default="bfloat16",
                   help="Autocast precision (train.dtype; parameters, gradients and AdamW state stay fp32).")
    p.add_argument("--gpu_gb", type=float, default=80.0, help="Memory of one device, GB, for the fits row.")
    p.add_argument("--lora_rank", type=int, default=0, help="Plan a LoRA fine-tune of this rank (train.lora_rank; "
                   "DDP only): gradients and AdamW state of the adapters alone.")
    p.add_argument("--lora_quantize", type=str | None, default=None, help="QLoRA: the frozen weights held as int8, "
                   "int4 or int4:GROUP_SIZE (train.lora_quantize).")
    p.add_argument("--lora_targets", type=list[str], default=["qkv", "proj", "up", "gate", "down"],
                   help="The layers LoRA adapts (train.lora_targets).")
    p.add_argument("--json", type=bool, default=False, help="Print machine-readable JSON.")


def cmd_consolidate(a: Namespace) -> None:
    from .api import consolidate

    path = consolidate(a.run)
    print(f"{path}: whole weights ({path.stat().st_size / 2**20:,.1f} MiB); `tlm sample`, `tlm eval`, `tlm export` "
          "and load_run read it")


def cmd_memory(a: Namespace) -> None:
    from .experiments.memory import plan_memory

    if not a.gpu_gb > 0:
        raise ConfigError(f"--gpu_gb must be > 0, got {a.gpu_gb}")
    cfg = ModelConfig(**a.model.as_dict())
    if a.lora_rank < 0:
        raise ConfigError(f"--lora_rank must be >= 0 (0: every weight trained), got {a.lora_rank}")
    # its one-line errors for a bad quantization or target
    TrainConfig(init_from=".", lora_rank=a.lora_rank, lora_quantize=a.lora_quantize, lora_targets=a.lora_targets)
    if a.lora_rank:  # LoRA trains under DDP only (train.py): its columns are DDP's
        import torch

        from .lora import base_bytes, lora_params

        trained = lora_params(cfg, a.lora_rank, a.lora_targets)
        held = base_bytes(cfg, a.lora_quantize, getattr(torch, a.dtype))  # (lora.hold_base_in, quantize_base)
        plans = {f"DDP+{'Q' if a.lora_quantize else ''}LoRA{'+AC' if ac else ''}": plan_memory(
            cfg, a.batch_size, a.seq_len, a.world_size, "ddp", a.dtype, ac, trained=trained, base_bytes=held)
            for ac in (False, True)}
    else:
        plans = {f"{par.upper()}{'+AC' if ac else ''}": plan_memory(cfg, a.batch_size, a.seq_len, a.world_size,
                                                                     par, a.dtype, ac)
                 for par in ("ddp", "fsdp") for ac in (False, True)}
    if a.json:
        print(json.dumps({"preset": a.preset, "config": cfg.to_dict(), "gpu_gb": a.gpu_gb,
                          "plans": {k: v.to_dict() for k, v in plans.items()}}, indent=2))
        return
    n = accounting.count_params(cfg).total
    # MB when every peak is under a GB: in GB a small model's table (the default preset's) was all 0.00
    unit, size = ("GB", 1e9) if max(v.peak for v in plans.values()) >= 1e9 else ("MB", 1e6)
    print(f"{a.preset or 'model config'}: {n:,} parameters; {a.batch_size} × {a.seq_len or cfg.block_size} tokens per "
          f"device and micro-step, {a.dtype} autocast, {a.world_size} devices; {unit} per device "
          f"(1 {unit} = 10{'⁹' if unit == 'GB' else '⁶'} bytes)")
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[a.dtype]
    base = a.lora_quantize or short
    rows = [(f"weights (base {base})" if a.lora_rank else "weights (fp32)", "weights"),
            ("gradients (fp32)", "gradients"), ("AdamW state", "optimizer"),
            ("autocast weight copies", "autocast_copies"), ("activations", "activations"),
            ("logits transient", "logits_transient"), ("one block's activations", "block_activations")]
    w = max(11, 2 + max(len(k) for k in plans))
    print(f"{'':<24}" + "".join(f"{k:>{w}}" for k in plans))
    for label, key in rows:
        print(f"{label:<24}" + "".join(f"{getattr(v, key) / size:>{w},.2f}" for v in plans.values()))
    print(f"{'peak':<24}" + "".join(f"{v.peak / size:>{w},.2f}" for v in plans.values()))
    print(f"{f'fits {a.gpu_gb:g} GB':<24}" + "".join(f"{'yes' if v.peak <= a.gpu_gb * 1e9 else 'no':>{w}}"
                                                   for v in plans.values()))


# --- end of the scaling block


def _add_bench_parser(cmds: dict[str, ArgumentParser]) -> None:
    p = cmds["bench"] = ArgumentParser(exit_on_error=False, description="Our model against Hugging Face transformers' "
                                       "(same config, same weights) on this device: training, prefill and decode "
                                       "tokens/s, peak memory, MFU and MBU (needs transformers: pip install "
                                       "'transformer-lm[bench]').")
    p.add_argument("--preset", type=str, default="gpt2", help=f"Model preset: {', '.join(presets())}.")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:N or mps.")
    p.add_argument("--steps", type=int, default=3,
                   help="Timed repetitions of each measurement per model, interleaved ours/theirs (after a warm-up).")
    p.add_argument("--batch", type=int, default=1, help="Sequences per training step.")
    p.add_argument("--seq", type=int | None, default=None, help="Tokens per training sequence (default: block size).")
    p.add_argument("--prefill_len", type=int, default=1024, help="Prompt tokens of the prefill (capped at block size).")
    p.add_argument("--new_tokens", type=int | None, default=None,
                   help="Greedy tokens per decode measurement (default: 128, or what the block size leaves).")
    p.add_argument("--decode_batch", type=int, default=8, help="Rows of the batched decode measurement.")
    p.add_argument("--quantize", type=str | None, default=None,
                   help="Also decode (batch 1) with our weights quantized (int8, w8a8, int4, int4:G) against their "
                   "fp32.")
    p.add_argument("--compile", type=bool, default=False,
                   help="Also train ours compiled (an extra row), and compile our decode step (in the warm-up).")
    p.add_argument("--threads", type=int | None, default=None, help="torch intra-op threads (default: torch's).")
    p.add_argument("--json", type=str | None, default=None, help="Also write every timing as JSON to this file.")


def cmd_bench(a: Namespace) -> None:
    from .bench import bench

    if a.threads is not None and a.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {a.threads}")
    if a.json:  # checked now, not after minutes of measuring
        if Path(a.json).is_dir():
            raise ConfigError(f"--json {a.json} is a folder; give a file path")
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    result = bench(a.preset, device=a.device, steps=a.steps, batch=a.batch, seq=a.seq, prefill_len=a.prefill_len,
                   new_tokens=a.new_tokens, decode_batch=a.decode_batch, quantize=a.quantize, compile=a.compile)
    print(result.table())
    if a.json:
        Path(a.json).write_text(json.dumps(result.to_dict(), indent=2))


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "info": cmd_info,
            "plan": cmd_plan, "attention": cmd_attention, "experiment": cmd_experiment, "report": cmd_report}
COMMANDS.update(convert=cmd_convert, export=cmd_export, bench=cmd_bench, serve=cmd_serve, chat=cmd_chat)
COMMANDS.update(consolidate=cmd_consolidate, memory=cmd_memory)


def _is_flag(option: str) -> bool:
    """Whether `option` is a true/false option of some tlm command (their default is a bool)."""
    parsers = list(build_parser()[1].values())
    while parsers:
        for action in parsers.pop()._actions:
            if option in action.option_strings and isinstance(action.default, bool):
                return True
            if isinstance(action.choices, dict):  # nested subcommands: `tlm experiment scaling`
                parsers += action.choices.values()
    return False


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    argv = sys.argv[1:] if argv is None else argv
    try:
        ns = parse(argv)
        a = ns[ns.command]
        code = COMMANDS[ns.command](a) or 0
    except (TLMError, argparse.ArgumentError) as e:
        msg = " ".join(str(e).split())  # one line, whatever the library or parser wrote
        listed = re.search(r'key "([\w.]+)": Expected a <class \'list\'>', msg)  # jsonargparse on `--stop a`
        if listed:
            opt = f"--{listed.group(1)}"
            msg += f"; write a list in brackets, {opt} '[a, b]', or give items one at a time with {opt}+ a"
        if re.search(r"Expected a <class 'int'>\. Got value: -?\d+\.0\b", msg):  # 2e6 given for an int field
            msg += "; write whole numbers in full (2000000, not 2e6)"
        bare = re.fullmatch(r"argument (--[\w.]+): expected one argument", msg)
        if bare and _is_flag(bare.group(1)):  # `--greedy` alone: true/false options take their value
            msg += f"; give it a value: {bare.group(1)} true (or false)"
        if msg.lower().startswith("unrecognized arguments") and argv[:1] == ["sample"]:  # an optional positional
            msg += "; the prompt goes right after the run folder: tlm sample RUN \"PROMPT\" [options]"
        rank, world = (int(v) if v.isdigit() else 0 for v in (os.environ.get("RANK", "0"),
                                                              os.environ.get("WORLD_SIZE", "1")))
        if world <= 1:
            print(f"tlm: error: {msg}", file=sys.stderr)
        elif rank == 0 or not isinstance(e, (ConfigError, argparse.ArgumentError)):  # settings: every rank alike
            # Rank 0's errors that on_main gives every rank are printed by each too, so that the message survives
            # whichever rank torchrun ends first (rank 0 hung freeing its group after the broadcast on torch 2.7
            # until parallel.distributed kept the group: a second printer costs one line)
            print(f"tlm: error (rank {rank} of {world}): {msg}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("tlm: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # the reader went away (`tlm sample ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush cannot fail again
        code = 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    except OSError as e:  # a path the system refuses (read-only, a file where a folder is meant, a full disk)
        what = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else " ".join(str(e).split())
        print(f"tlm: error: {what}; check the path, its permissions and the free space", file=sys.stderr)
        code = 2
    parallel = sys.modules.get(f"{__package__}.parallel")  # imported by the commands that can start a process group
    if parallel is not None:
        parallel.leave(code)  # a torchrun worker that ran one ends here
    return code


if __name__ == "__main__":
    sys.exit(main())
