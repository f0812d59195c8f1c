"""`tlm`: a thin command-line layer over the library. Parsers are generated from the config dataclasses (jsonargparse),
so `--help` lists every field with its default and docstring, YAML configs load with `--config`, and any field is
overridable on the command line. Library errors become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

from . import accounting
from .config import ModelConfig, SampleConfig, TrainConfig, preset, preset_recipe, presets
from .errors import ConfigError, DistributedError, TLMError

log = logging.getLogger("transformer_lm")
T = TypeVar("T")

TOKENIZER_HELP = "Tokenizer for raw text: byte, char, bpe (trained on the corpus) or gpt2 (needs --gpt2_dir)."
QUANTIZE_HELP = ("Quantization applied after loading: int8 (weight-only, the LM head included), int4 or "
                 "int4:GROUP_SIZE (weight-only, default group 128), or w8a8 (int8 weights and per-call int8 "
                 "activations on fbgemm's CPU kernels: the fastest on a CPU, a little less exact).")


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
                   help="Model preset applied before --model.* overrides (a recipe preset, like shakespeare-speedrun, "
                   f"also sets --train.* defaults): {', '.join(presets())}.")
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
    p.add_argument("--quantize", type=str | None, default=None, help=QUANTIZE_HELP)
    p.add_argument("--draft", type=str | None, default=None,
                   help="Run folder of a smaller model with the same tokenizer: speculative decoding (same output "
                   "distribution, fewer target forwards).")
    p.add_argument("--draft_k", type=int, default=4, help="Tokens the draft proposes per target forward.")
    p.add_argument("--verbose", type=bool, default=False,
                   help="After each sample, print prefill and decode tokens/s and the decode's MBU (memory "
                   "bandwidth utilization: bytes read per token × tokens/s ÷ measured copy bandwidth) to stderr.")

    p = cmds["eval"] = ArgumentParser(exit_on_error=False, description="Loss, perplexity and bits per byte on text.")
    p.add_argument("run", type=str, help="Run folder.")
    p.add_argument("--data", type=str, required=True, help="Text file, folder or glob to evaluate on.")
    p.add_argument("--batch_size", type=int, default=8, help="Windows per forward pass.")
    p.add_argument("--json", type=bool, default=False, help="Print machine-readable JSON.")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:N or mps.")
    p.add_argument("--quantize", type=str | None, default=None, help=QUANTIZE_HELP)

    p = cmds["info"] = ArgumentParser(exit_on_error=False, description="Parameters, FLOPs and memory of a model.")
    p.add_argument("run", type=str | None, nargs="?", default=None, help="Run folder (default: use --preset).")
    p.add_argument("--preset", type=str | None, default="tiny", help=f"Model preset: {', '.join(presets())}.")
    p.add_class_arguments(ModelConfig, "model", instantiate=False)
    p.add_argument("--json", type=bool, default=False, help="Print machine-readable JSON.")
    _add_experiment_parsers(cmds)
    _add_interop_parsers(cmds)
    _add_bench_parser(cmds)
    _add_scaling_parsers(cmds)

    for name, p in cmds.items():
        sub.add_subcommand(name, p, help=p.description)
    _add_experiment_subcommands(cmds["experiment"])  # nested subcommands go in after their parent
    return parser, cmds


def parse(argv: list[str]) -> Namespace:
    """Parse twice when a preset is named: the preset's fields (and a recipe preset's training settings) become the
    defaults that --model.* and --train.* then override, whatever the order on the command line or in --config."""
    parser, cmds = build_parser()
    ns = parser.parse_args(argv)
    cmd = ns.command
    chosen = ns[cmd].get("preset")
    if chosen and cmd in ("train", "info", "plan", "memory"):
        defaults = {f"model.{k}": v for k, v in preset(chosen).items()}
        if cmd == "train":
            defaults |= {f"train.{k}": v for k, v in preset_recipe(chosen).items()}
        cmds[cmd].set_defaults(defaults)
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
    from .train import resumed_data, train, training_data

    model_cfg = ModelConfig(**a.model.as_dict())
    train_cfg = TrainConfig(**a.train.as_dict())
    data_arg = a.data
    if a.resume and data_arg is None:  # continue on the data the run was started with
        data_arg = resumed_data(a.out)
    data = training_data(data_arg, a.tokenizer, a.vocab_size, a.gpt2_dir)
    extra = {"data": {"source": a.data or "python-stdlib", "tokenizer": a.tokenizer, "prepared": str(data.path)},
             "preset": a.preset}
    res = train(model_cfg, train_cfg, data, a.out, resume=a.resume, overwrite=a.overwrite, extra_config=extra)
    if not res.is_main:  # under torchrun, rank 0 reports for all
        return 130 if res.interrupted else 0
    val = f", val loss {res.val.loss:.4f}, bpb {res.val.bpb:.4f}" if res.val else ""
    if res.interrupted:
        print(f"interrupted: checkpoint saved at step {res.step} in {res.run_dir}; continue with --resume",
              file=sys.stderr)
        return 130
    print(f"{res.run_dir}: {res.step} steps, {res.tokens:,} tokens in {res.elapsed:.1f}s{val}")
    return 0


def cmd_sample(a: Namespace) -> None:
    from .api import load_run
    from .decode import DecodeStats
    from .perf import decode_mbu
    from .quantize import parse_quantize

    prompt = a.prompt
    if prompt is None:
        prompt = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    cfg = _config(SampleConfig, a)
    run = load_run(a.run, a.device)
    if a.quantize:
        run.quantize(**parse_quantize(a.quantize))
    run.use_decode_layout()
    if a.draft:
        run.use_draft(load_run(a.draft, a.device).use_decode_layout(), a.draft_k)
    stats = DecodeStats() if a.verbose else None
    for i, pieces in enumerate(run.stream_samples(prompt, cfg, stats)):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if stats is not None and stats.new_tokens:
            sys.stdout.flush()
            tps = stats.decode_tokens_per_s
            mbu = decode_mbu(run.model, tps, (stats.prompt_tokens + stats.context) // 2)
            print(f"prefill {stats.prompt_tokens} tokens at {stats.prefill_tokens_per_s:.1f} tokens/s; decode "
                  f"{stats.new_tokens} tokens at {tps:.1f} tokens/s, MBU {mbu:.0%}"
                  + (" (the first sample includes compiling)" if cfg.compile and i == 0 else ""), file=sys.stderr)


def cmd_eval(a: Namespace) -> None:
    from .api import load_run
    from .quantize import parse_quantize

    run = load_run(a.run, a.device)
    if a.quantize:
        run.quantize(**parse_quantize(a.quantize))
    res = run.evaluate(a.data, a.batch_size)
    if a.json:
        print(json.dumps(res.to_dict()))
    else:
        print(f"loss {res.loss:.4f}  perplexity {res.perplexity:.3f}  bits/byte {res.bpb:.4f}  ({res.tokens:,} tokens)")


def cmd_info(a: Namespace) -> None:
    if a.run:
        from .api import read_run_config

        cfg = read_run_config(a.run)[1]  # the config alone: no need to load the weights
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


# --- Experiments (issue 6): `tlm plan` and `tlm attention`. Parsers and commands kept together in this block.


def _add_experiment_parsers(cmds: dict[str, ArgumentParser]) -> None:
    from .experiments.planner import ACCELERATORS

    p = cmds["plan"] = ArgumentParser(exit_on_error=False, description="Training FLOPs, Chinchilla-optimal size, "
                                      "time, GPU-hours, energy and memory of a model on named hardware.")
    p.add_argument("--preset", type=str | None, default=None,
                   help=f"Model preset applied before --model.* overrides: {', '.join(presets())}.")
    p.add_class_arguments(ModelConfig, "model", instantiate=False)
    p.add_argument("--params", type=str | None, default=None,
                   help="A bare parameter count N instead of a model config (175e9, 175B, 1.4T); counts 6·N·D only.")
    p.add_argument("--tokens", type=str | None, default=None,
                   help="Training tokens D (300e9, 300B). Default: --compute / FLOPs per token with --compute, "
                   "else Chinchilla-optimal 20 per parameter.")
    p.add_argument("--compute", type=str | None, default=None,
                   help="A compute budget in FLOPs (3.14e23) for the Chinchilla-optimal N and D; alone, plans that "
                   "optimal model.")
    p.add_argument("--seq_len", type=int | None, default=None,
                   help="Training context for the attention FLOPs (default: the model's block_size).")
    p.add_argument("--hardware", type=str, default="H100-SXM",
                   help=f"Accelerator: {', '.join(a.name for a in ACCELERATORS.values())}, or all.")
    p.add_argument("--precision", type=Literal["bf16", "fp32"], default="bf16", help="Which vendor peak to use.")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="Model-FLOPs utilization, assumed or measured: achieved / peak FLOP/s.")
    p.add_argument("--gpus", type=int, default=1, help="Number of accelerators.")
    p.add_argument("--pue", type=float, default=1.0,
                   help="Power usage effectiveness of the facility (1.0: the accelerators' TDP only).")
    p.add_argument("--json", type=bool, default=False, help="Print machine-readable JSON.")

    p = cmds["attention"] = ArgumentParser(exit_on_error=False, description="Per-layer, per-head attention maps and "
                                           "per-token loss (surprisal) of a text under a trained run.")
    p.add_argument("run", type=str, help="Run folder.")
    p.add_argument("text", type=str, help="The text to analyze (its first block_size tokens).")
    p.add_argument("--out", type=str, required=True,
                   help="Folder for attention_grid.png, attention_L{l}_H{h}.png, surprisal.png and attention.json.")
    p.add_argument("--layer", type=int, default=-1, help="Layer of the zoom and of the table (negative: from the end).")
    p.add_argument("--head", type=int | None, default=0,
                   help="Head of the zoom and of the table; null for the mean over the layer's heads.")
    p.add_argument("--top_k", type=int, default=3, help="Attended tokens listed per token.")
    p.add_argument("--json", type=bool, default=False, help="Print attention.json instead of the table.")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:N or mps.")

    cmds["experiment"] = ArgumentParser(exit_on_error=False, description="Run an experiment: "
                                        f"{', '.join(EXPERIMENTS)} (see `tlm experiment NAME --help`).")

    p = cmds["report"] = ArgumentParser(exit_on_error=False, description="One offline HTML page (images embedded, no "
                                        "scripts) about runs and experiment output folders.")
    p.add_argument("paths", type=str, nargs="+", help="Run folders and experiment output folders (runs inside them "
                   "are found too).")
    p.add_argument("--out", type=str, default="report.html", help="HTML file to write.")
    p.add_argument("--title", type=str, default="transformer-lm report", help="Title of the page.")


def cmd_plan(a: Namespace) -> None:
    from .experiments.planner import CHINCHILLA_TOKENS_PER_PARAM, TRAIN_BYTES_PER_PARAM, parse_count, plan

    params = parse_count(a.params, "--params") if a.params is not None else None
    tokens = parse_count(a.tokens, "--tokens") if a.tokens is not None else None
    compute = parse_count(a.compute, "--compute") if a.compute is not None else None
    model_given = a.preset is not None or a.model.as_dict() != ModelConfig().to_dict()
    if params is not None and model_given:
        raise ConfigError("give either --params or a model (--preset / --model.*), not both")
    config = None
    if params is None and (model_given or compute is None):
        config = ModelConfig(**a.model.as_dict())
    res = plan(params, config, tokens, compute, a.hardware, a.mfu, a.gpus, a.pue, a.precision, a.seq_len)
    if a.json:
        print(json.dumps({"preset": a.preset, **res.to_dict()}, indent=2))
        return
    if config is not None:
        what = f"{a.preset} preset" if a.preset else "model config"
        model = (f"{what}: {res.params:,.0f} parameters ({res.non_embedding_params:,.0f} non-embedding), "
                 f"context {res.seq_len}")
    else:
        model = f"{res.params:,.0f} parameters" + (" (Chinchilla-optimal for --compute)" if params is None else "")
    rows = [("model", model),
            ("tokens", f"{res.tokens:,.0f} ({res.tokens_per_param:.1f} tokens/parameter; Chinchilla-optimal: "
                       f"{CHINCHILLA_TOKENS_PER_PARAM:.0f})"),
            ("training FLOPs", f"{res.total_flops:.3e} = {res.dense_flops:.3e} dense (6·N·D) + "
                               f"{res.attention_flops:.3e} attention" if config is not None else
                               f"{res.total_flops:.3e} = 6·N·D (attention not counted: no architecture given)"),
            ("Chinchilla-optimal", f"for C = {res.compute_budget:.3e} FLOPs: N = {res.optimal_params:.3e} "
                                   f"parameters, D = {res.optimal_tokens:.3e} tokens (C = 6·N·D, D = 20·N)"),
            ("memory per device", f"training {res.memory_bytes['train_replicated'] / 1e9:,.2f} GB replicated, "
                                  f"{res.memory_bytes['train_sharded'] / 1e9:,.2f} GB sharded over {a.gpus} "
                                  f"({TRAIN_BYTES_PER_PARAM} B/param: weights, gradients, AdamW; no activations); "
                                  f"inference {res.memory_bytes['inference_weights_bf16'] / 1e9:,.2f} GB (bf16)")]
    for k, v in rows:
        print(f"{k:<20}{v}")
    print()
    print(f"{'hardware':<11}{'peak TFLOP/s':>13} {'MFU':>5} {'GPUs':>5} {'time':>12} {'GPU-hours':>12} "
          f"{'energy kWh':>12}  fits DDP/FSDP")
    for e in res.estimates:
        energy = f"{e.energy_kwh:,.1f}" if e.energy_kwh is not None else "n/a"
        fits = f"{'yes' if e.fits_replicated else 'no'}/{'yes' if e.fits_sharded else 'no'} of {e.memory_gb:g} GB"
        print(f"{e.hardware:<11}{e.peak_tflops:>8,.1f} {e.precision:<4} {e.mfu:>5.2f} {e.gpus:>5} "
              f"{_duration(e.seconds):>12} {e.gpu_hours:>12,.1f} {energy:>12}  {fits}" + (f"  ({e.note})" if e.note
                                                                                           else ""))
    if any(e.energy_kwh is None for e in res.estimates):
        print("n/a: the vendor publishes no TDP for this accelerator")
    print(f"energy = GPU-hours × TDP × PUE {a.pue:g} (an upper bound: accelerators rarely draw their TDP)")


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.1f} s"


def cmd_attention(a: Namespace) -> None:
    from .api import load_run
    from .experiments.attention import analyze, render_table, write_report

    run = load_run(a.run, a.device)
    report = analyze(run.model, run.tokenizer, a.text)
    files = write_report(report, a.out, a.layer, a.head, a.top_k,
                         extra={"run": str(a.run), "step": run.step, "text": a.text})
    if a.json:
        print(files["json"].read_text(encoding="utf-8"), end="")
        return
    print(render_table(report, a.layer, a.head, a.top_k))
    print("wrote " + ", ".join(str(p) for p in files.values()))


def cmd_report(a: Namespace) -> None:
    from .experiments.report import write_report

    print(f"wrote {write_report(a.paths, a.out, a.title)}")


# `tlm experiment NAME`: EXPERIMENTS maps each name to (a function building its parser, its command).


def _config(cls: type[T], a: Namespace) -> T:
    """The config dataclass `cls` from the parsed fields it declares (added flat by add_class_arguments)."""
    return cls(**{k: a[k] for k in cls.__dataclass_fields__})


def _experiment_parser(config: type, out: str, description: str) -> ArgumentParser:
    """A `tlm experiment NAME` parser: --out and every field of the experiment's config dataclass."""
    p = ArgumentParser(exit_on_error=False, description=description)
    p.add_argument("--out", type=str, default=out, help="Output folder.")
    p.add_class_arguments(config, nested_key=None, instantiate=False)
    return p


def _print_results(table: str, files: dict[str, Path]) -> None:
    print(table)
    print("wrote " + ", ".join(str(p) for p in files.values()))


def _scaling_parser() -> ArgumentParser:
    from .experiments.scaling import ScalingConfig

    p = ArgumentParser(exit_on_error=False, description="Scaling-law sweep: train a ladder of model sizes on the same "
                       "data, fit L(N) = E + A·N^-α and L(C) on the compute frontier; CSV, JSON and plots in --out.")
    p.add_argument("data", type=str | None, nargs="?", default=None,
                   help="Text file, folder, glob, or a folder made by `tlm prepare` (default: embedded corpus).")
    p.add_argument("--out", type=str, default="runs/scaling", help="Output folder (rungs in OUT/runs/).")
    p.add_class_arguments(ScalingConfig, nested_key=None, instantiate=False)
    _add_tokenizer_args(p)
    p.add_argument("--overwrite", type=bool, default=False, help="Replace rung folders that hold other runs.")
    return p


def cmd_scaling(a: Namespace) -> None:
    from .experiments.scaling import ScalingConfig, render_summary, run_scaling
    from .train import training_data

    cfg = _config(ScalingConfig, a)
    data = training_data(a.data, a.tokenizer, a.vocab_size, a.gpt2_dir)
    res = run_scaling(cfg, data, a.out, overwrite=a.overwrite, data_label=a.data or "python-stdlib")
    _print_results(render_summary(res), res.files)


def _pe_ablation_parser() -> ArgumentParser:
    from .experiments.synthetic_pe import PEAblationConfig

    return _experiment_parser(PEAblationConfig, "runs/pe-ablation", "Positional-encoding ablation: sequence reversal "
                              "learned with each encoding (and none); accuracy table, CSV, JSON and plot in --out.")


def cmd_pe_ablation(a: Namespace) -> None:
    from .experiments.synthetic_pe import PEAblationConfig, render_table, run_pe_ablation

    res = run_pe_ablation(_config(PEAblationConfig, a), a.out)
    _print_results(render_table(res), res.files)


def _speed_parser() -> ArgumentParser:
    from .experiments.speed import SpeedConfig

    return _experiment_parser(SpeedConfig, "runs/speed", "Parallel vs recurrent: training tokens/s and forward latency "
                              "of a Transformer and an LSTM and RNN of matched size against sequence length; table, "
                              "CSV, JSON and plot in --out.")


def cmd_speed(a: Namespace) -> None:
    from .experiments.speed import SpeedConfig, render_table, run_speed

    rows, files = run_speed(_config(SpeedConfig, a), a.out,
                            on_row=lambda r: log.info("%s T=%d: %.0f training tokens/s, forward %.2f ms", r.arch,
                                                      r.seq_len, r.train_tokens_per_s, r.forward_ms))
    _print_results(render_table(rows), files)


def _long_range_parser() -> ArgumentParser:
    from .experiments.long_range import LongRangeConfig

    return _experiment_parser(LongRangeConfig, "runs/long-range", "Long-range dependencies: a Transformer and an LSTM "
                              "of matched size trained on associative recall and copy, accuracy against the distance "
                              "to the answer; table, CSV, JSON and plot in --out.")


def cmd_long_range(a: Namespace) -> None:
    from .experiments.long_range import LongRangeConfig, render_table, run_long_range

    def progress(task: str, arch: str, step: int, loss: float) -> None:
        if (step + 1) % 250 == 0:
            log.info("%s %s: step %d, loss %.4f", task, arch, step + 1, loss)

    results, files = run_long_range(_config(LongRangeConfig, a),
                                    a.out, progress)
    _print_results(render_table(results), files)


EXPERIMENTS: dict[str, tuple[Callable[[], ArgumentParser], Callable[[Namespace], int | None]]] = {
    "scaling": (_scaling_parser, cmd_scaling),
    "pe-ablation": (_pe_ablation_parser, cmd_pe_ablation),
    "speed": (_speed_parser, cmd_speed),
    "long-range": (_long_range_parser, cmd_long_range),
}


def _add_experiment_subcommands(p: ArgumentParser) -> None:
    group = p.add_subcommands(dest="name")
    for name, (build, _) in EXPERIMENTS.items():
        q = build()
        group.add_subcommand(name, q, help=q.description)


def cmd_experiment(a: Namespace) -> int | None:
    return EXPERIMENTS[a.name][1](a[a.name])


# --- end of the experiments block


# --- Interop (issue 3): `tlm convert` (import into a run folder) and `tlm export` (run → Hugging Face folder).


def _add_interop_parsers(cmds: dict[str, ArgumentParser]) -> None:
    p = cmds["convert"] = ArgumentParser(exit_on_error=False, description="Import a model into a run folder: a "
                                         "Hugging Face folder (gpt2, llama, mistral, qwen2) or a llama2.c .bin file.")
    p.add_argument("src", type=str, help="Hugging Face model folder (config.json, safetensors, tokenizer.json) or "
                   "llama2.c .bin checkpoint.")
    p.add_argument("--out", type=str, required=True, help="Run folder to write.")
    p.add_argument("--dtype", type=str | None, default=None,
                   help="Cast Hugging Face weights to float32, bfloat16 or float16 (default: keep their dtype).")
    p.add_argument("--tokenizer", type=str | None, default=None,
                   help="llama2.c only: tokenizer.bin or tokenizer.model (default: the one beside the .bin).")
    p.add_argument("--overwrite", type=bool, default=False, help="Replace what --out already holds.")

    p = cmds["export"] = ArgumentParser(exit_on_error=False, description="Export a run's latest checkpoint as a "
                                        "Hugging Face folder that transformers' from_pretrained loads.")
    p.add_argument("run", type=str, help="Run folder.")
    p.add_argument("--out", type=str, required=True, help="Folder to write.")
    p.add_argument("--family", type=str | None, default=None,
                   help="gpt2, llama, mistral or qwen2 (default: the one the architecture matches).")
    p.add_argument("--dtype", type=str | None, default=None,
                   help="float32, bfloat16 or float16 (default: the checkpoint's dtype).")
    p.add_argument("--overwrite", type=bool, default=False, help="Replace what --out already holds.")


def cmd_convert(a: Namespace) -> None:
    if Path(a.src).is_file() and a.src.endswith(".bin"):
        from .interop.llama2c import import_llama2c

        out = import_llama2c(a.src, a.out, a.tokenizer, overwrite=a.overwrite)
    else:
        from .interop.hf import import_hf

        out = import_hf(a.src, a.out, a.dtype, a.overwrite)
    print(f"{out}: imported {a.src}; try `tlm sample {out}`")


def cmd_export(a: Namespace) -> None:
    from .interop.hf import export_hf

    out = export_hf(a.run, a.out, a.family, a.dtype, a.overwrite)
    print(f"{out}: exported {a.run} for transformers' from_pretrained")


# --- end of the interop block


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
    p.add_argument("--json", type=bool, default=False, help="Print machine-readable JSON.")


def cmd_consolidate(a: Namespace) -> None:
    from .api import consolidate

    path = consolidate(a.run)
    print(f"{path}: whole weights ({path.stat().st_size / 2**20:,.1f} MiB); `tlm sample`, `tlm eval`, `tlm export` "
          "and load_run read it")


def cmd_memory(a: Namespace) -> None:
    from .experiments.memory import plan_memory

    cfg = ModelConfig(**a.model.as_dict())
    plans = {f"{par.upper()}{'+AC' if ac else ''}": plan_memory(cfg, a.batch_size, a.seq_len, a.world_size, par,
                                                                 a.dtype, ac)
             for par in ("ddp", "fsdp") for ac in (False, True)}
    if a.json:
        print(json.dumps({"preset": a.preset, "config": cfg.to_dict(), "gpu_gb": a.gpu_gb,
                          "plans": {k: v.to_dict() for k, v in plans.items()}}, indent=2))
        return
    n = accounting.count_params(cfg).total
    print(f"{a.preset or 'model config'}: {n:,} parameters; {a.batch_size} × {a.seq_len or cfg.block_size} tokens per "
          f"device and micro-step, {a.dtype} autocast, {a.world_size} devices; GB per device (1 GB = 10⁹ bytes)")
    rows = [("weights (fp32)", "weights"), ("gradients (fp32)", "gradients"), ("AdamW state", "optimizer"),
            ("autocast weight copies", "autocast_copies"), ("activations", "activations"),
            ("logits transient", "logits_transient"), ("one block's activations", "block_activations")]
    print(f"{'':<24}" + "".join(f"{k:>11}" for k in plans))
    for label, key in rows:
        print(f"{label:<24}" + "".join(f"{getattr(v, key) / 1e9:>11,.2f}" for v in plans.values()))
    print(f"{'peak':<24}" + "".join(f"{v.peak / 1e9:>11,.2f}" for v in plans.values()))
    print(f"{f'fits {a.gpu_gb:g} GB':<24}" + "".join(f"{'yes' if v.peak <= a.gpu_gb * 1e9 else 'no':>11}"
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
    p.add_argument("--new_tokens", type=int, default=32, help="Greedy tokens per decode measurement.")
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
COMMANDS.update(convert=cmd_convert, export=cmd_export, bench=cmd_bench)
COMMANDS.update(consolidate=cmd_consolidate, memory=cmd_memory)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    argv = sys.argv[1:] if argv is None else argv
    try:
        ns = parse(argv)
        a = ns[ns.command]
        return COMMANDS[ns.command](a) or 0
    except DistributedError as e:
        # A process group that lost a peer can deadlock when it is freed (gloo's destructor joins a worker thread
        # that waits for the interpreter lock), so leave at once: the last checkpoint on disk is what there is to keep.
        print(f"tlm: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    except (TLMError, argparse.ArgumentError) as e:
        msg = " ".join(str(e).split())  # one line, whatever the library or parser wrote
        print(f"tlm: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
