"""`tlm`: a thin command-line layer over the library. Parsers are generated from the config dataclasses (jsonargparse),
so `--help` lists every field with its default and docstring, YAML configs load with `--config`, and any field is
overridable on the command line. Library errors become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

from . import accounting
from .config import ModelConfig, SampleConfig, TrainConfig, preset, presets
from .errors import TLMError

log = logging.getLogger("transformer_lm")

TOKENIZER_HELP = "Tokenizer for raw text: byte, char, bpe (trained on the corpus) or gpt2 (needs --gpt2_dir)."


def _add_tokenizer_args(p: ArgumentParser) -> None:
    p.add_argument("--tokenizer", type=str, default="byte", help=TOKENIZER_HELP)
    p.add_argument("--vocab_size", type=int, default=4096, help="Vocabulary size of a trained bpe tokenizer.")
    p.add_argument("--gpt2_dir", type=str | None, default=None,
                   help="Folder with GPT-2's encoder.json and vocab.bpe (for --tokenizer gpt2).")


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
    _add_tokenizer_args(p)
    p.add_argument("--val_fraction", type=float, default=0.1, help="Fraction of the text held out for validation.")
    p.add_argument("--workers", type=int | None, default=None, help="Tokenizer processes (default: all cores).")

    p = cmds["train"] = ArgumentParser(exit_on_error=False, description="Train a model (default data: the Python "
                                       "standard library's source, so it works offline).")
    p.add_argument("--config", action=ActionConfigFile, help="YAML/JSON file of options (fields as below).")
    p.add_argument("data", type=str | None, nargs="?", default=None,
                   help="Text file, folder, glob, or a folder made by `tlm prepare` (default: embedded corpus).")
    p.add_argument("--out", type=str, default="runs/default", help="Run folder for checkpoints, metrics and plots.")
    p.add_argument("--preset", type=str | None, default="tiny",
                   help=f"Model preset applied before --model.* overrides: {', '.join(presets())}.")
    p.add_class_arguments(ModelConfig, "model", instantiate=False)
    p.add_class_arguments(TrainConfig, "train", instantiate=False)
    _add_tokenizer_args(p)
    p.add_argument("--resume", type=bool, default=False, help="Continue the run in --out from its last checkpoint.")
    p.add_argument("--overwrite", type=bool, default=False, help="Replace a different run already in --out.")

    p = cmds["sample"] = ArgumentParser(exit_on_error=False, description="Generate text from a trained run.")
    p.add_argument("run", type=str, help="Run folder.")
    p.add_argument("prompt", type=str | None, nargs="?", default=None,
                   help="Prompt text (default: read standard input when it is not a terminal, else empty).")
    p.add_class_arguments(SampleConfig, nested_key=None, instantiate=False)
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:N or mps.")

    p = cmds["eval"] = ArgumentParser(exit_on_error=False, description="Loss, perplexity and bits per byte on text.")
    p.add_argument("run", type=str, help="Run folder.")
    p.add_argument("--data", type=str, required=True, help="Text file, folder or glob to evaluate on.")
    p.add_argument("--batch_size", type=int, default=8, help="Windows per forward pass.")
    p.add_argument("--json", type=bool, default=False, help="Print machine-readable JSON.")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:N or mps.")

    p = cmds["info"] = ArgumentParser(exit_on_error=False, description="Parameters, FLOPs and memory of a model.")
    p.add_argument("run", type=str | None, nargs="?", default=None, help="Run folder (default: use --preset).")
    p.add_argument("--preset", type=str | None, default="tiny", help=f"Model preset: {', '.join(presets())}.")
    p.add_class_arguments(ModelConfig, "model", instantiate=False)
    p.add_argument("--json", type=bool, default=False, help="Print machine-readable JSON.")

    for name, p in cmds.items():
        sub.add_subcommand(name, p, help=p.description)
    return parser, cmds


def parse(argv: list[str]) -> Namespace:
    """Parse twice when a preset is named: the preset's fields become the defaults that --model.* then overrides,
    whatever the order on the command line or in a --config file."""
    parser, cmds = build_parser()
    ns = parser.parse_args(argv)
    cmd = ns.command
    chosen = ns[cmd].get("preset")
    if chosen and cmd in ("train", "info"):
        cmds[cmd].set_defaults({f"model.{k}": v for k, v in preset(chosen).items()})
        ns = parser.parse_args(argv)
    return ns


def cmd_prepare(a: Namespace) -> None:
    from .data import prepare, read_sources, resolve_sources
    from .tokenizers import build_tokenizer

    sources = [p for s in a.sources for p in resolve_sources(s)]
    tok = build_tokenizer(a.tokenizer, read_sources(sources), a.vocab_size, a.gpt2_dir)
    m = prepare(sources, Path(a.out), tok, a.val_fraction, a.workers)
    print(f"{a.out}: {m['train_tokens']:,} train + {m['val_tokens']:,} val tokens ({m['dtype']}), "
          f"{tok.kind} tokenizer with {tok.vocab_size:,} ids")


def cmd_train(a: Namespace) -> int:
    from .train import train, training_data

    model_cfg = ModelConfig(**a.model.as_dict())
    train_cfg = TrainConfig(**a.train.as_dict())
    data = training_data(a.data, a.tokenizer, a.vocab_size, a.gpt2_dir)
    extra = {"data": {"source": a.data or "python-stdlib", "tokenizer": a.tokenizer},
             "preset": a.preset}
    res = train(model_cfg, train_cfg, data, a.out, resume=a.resume, overwrite=a.overwrite, extra_config=extra)
    val = f", val loss {res.val.loss:.4f}, bpb {res.val.bpb:.4f}" if res.val else ""
    if res.interrupted:
        print(f"interrupted: checkpoint saved at step {res.step} in {res.run_dir}; continue with --resume",
              file=sys.stderr)
        return 130
    print(f"{res.run_dir}: {res.step} steps, {res.tokens:,} tokens in {res.elapsed:.1f}s{val}")
    return 0


def cmd_sample(a: Namespace) -> None:
    from .api import load_run

    prompt = a.prompt
    if prompt is None:
        prompt = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    cfg = SampleConfig(**{k: a[k] for k in SampleConfig.__dataclass_fields__})
    run = load_run(a.run, a.device)
    for i, pieces in enumerate(run.stream_samples(prompt, cfg)):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def cmd_eval(a: Namespace) -> None:
    from .api import load_run

    res = load_run(a.run, a.device).evaluate(a.data, a.batch_size)
    if a.json:
        print(json.dumps(res.to_dict()))
    else:
        print(f"loss {res.loss:.4f}  perplexity {res.perplexity:.3f}  bits/byte {res.bpb:.4f}  ({res.tokens:,} tokens)")


def cmd_info(a: Namespace) -> None:
    if a.run:
        from .api import load_run

        cfg = ModelConfig.from_dict(load_run(a.run, "cpu").config["model"])
    else:
        cfg = ModelConfig(**a.model.as_dict())
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
    print(f"{'FLOPs/token forward':<28}{fl['forward']:>18,.0f}   (context {cfg.block_size})")
    print(f"{'FLOPs/token training':<28}{fl['train']:>18,.0f}   (3x forward)")
    for k in ("weights", "gradients", "optimizer", "total"):
        print(f"{'memory ' + k + (' (AdamW)' if k == 'optimizer' else ''):<28}{_gib(mem[k]):>18}")
    print("config: " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))


def _gib(n: int) -> str:
    return f"{n / 2**30:,.3f} GiB" if n >= 2**27 else f"{n / 2**20:,.2f} MiB"


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    argv = sys.argv[1:] if argv is None else argv
    try:
        ns = parse(argv)
        a = ns[ns.command]
        return COMMANDS[ns.command](a) or 0
    except (TLMError, argparse.ArgumentError) as e:
        msg = " ".join(str(e).split())  # one line, whatever the library or parser wrote
        print(f"tlm: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
