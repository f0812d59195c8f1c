"""The experiment commands of `tlm` (parsers and commands): `tlm plan`, `tlm attention`, `tlm report` and
`tlm experiment scaling | pe-ablation | speed | long-range`. cli.py registers them; each command imports its
experiment module only when run."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser, Namespace

from .cli_args import add_tokenizer_args, config_from
from .config import ModelConfig, presets
from .errors import ConfigError, RunExistsError

log = logging.getLogger("transformer_lm")


def add_experiment_parsers(cmds: dict[str, ArgumentParser]) -> None:
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
                   help="Training context for the attention FLOPs (default: the model's block_size); needs a model, "
                   "not --params.")
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
    p.add_argument("--overwrite", type=bool, default=False,
                   help="Replace the maps an earlier `tlm attention` wrote into --out (all its zoom images too).")

    cmds["experiment"] = ArgumentParser(exit_on_error=False, description="Run an experiment: "
                                        f"{', '.join(EXPERIMENTS)} (see `tlm experiment NAME --help`).")

    p = cmds["report"] = ArgumentParser(exit_on_error=False, description="One offline HTML page (images embedded, no "
                                        "scripts) about runs and experiment output folders.")
    p.add_argument("paths", type=str, nargs="+", help="Run folders and experiment output folders (runs inside them "
                   "are found too).")
    p.add_argument("--out", type=str, default="report.html", help="HTML file to write (named .html or .htm).")
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
        how = "" if params is not None else " (Chinchilla-optimal for --compute)" if tokens is None else \
            " (N = C / (6·D) for --compute and --tokens)"
        model = f"{res.params:,.0f} parameters{how}"
    rows = [("model", model),
            ("tokens", f"{res.tokens:,.0f} ({res.tokens_per_param:.1f} tokens/parameter; Chinchilla-optimal: "
                       f"{CHINCHILLA_TOKENS_PER_PARAM:.0f})"),
            ("training FLOPs", f"{res.total_flops:.3e} = {res.dense_flops:.3e} dense (6 × "
                               f"{res.dense_flops / (6 * res.tokens):,.0f} matmul weights × D) + "
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


def _check_results(out: str, patterns: tuple[str, ...], overwrite: bool, command: str) -> list[Path]:
    """Refuse an --out that holds an earlier run's results of `command` (files matching `patterns`) unless
    `overwrite`, before any work; -> those files, for the command to delete once its new results are ready."""
    old = sorted({f for pattern in patterns for f in Path(out).glob(pattern) if f.is_file()})
    if old and not overwrite:
        raise RunExistsError(f"{out} holds the results of an earlier `tlm {command}` ({old[0].name}); pass "
                             "--overwrite true to replace them, or choose another --out")
    return old


def cmd_attention(a: Namespace) -> None:
    from .api import load_run
    from .experiments.attention import analyze, render_table, write_report

    if a.top_k < 1:
        raise ConfigError(f"--top_k must be >= 1, got {a.top_k}")
    old = _check_results(a.out, ("attention.json", "attention_grid.png", "attention_L*_H*.png", "surprisal.png"),
                         a.overwrite, "attention")
    run = load_run(a.run, a.device)
    report = analyze(run.model, run.tokenizer, a.text)
    report.check_head(a.layer, a.head)  # a bad --layer / --head is refused before the old maps go
    for f in old:  # zoom images of other heads would otherwise sit beside maps of another text
        f.unlink()
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


def _experiment_parser(config: type, out: str, description: str) -> ArgumentParser:
    """A `tlm experiment NAME` parser: --out, --overwrite and every field of the experiment's config dataclass."""
    p = ArgumentParser(exit_on_error=False, description=description)
    p.add_argument("--out", type=str, default=out, help="Output folder.")
    p.add_argument("--overwrite", type=bool, default=False, help="Replace the results an earlier run wrote to --out.")
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
                   help="Text file, folder, glob, or a folder made by `tlm prepare` (default: this Python's standard "
                        "library source).")
    p.add_argument("--out", type=str, default="runs/scaling", help="Output folder (rungs in OUT/runs/).")
    p.add_class_arguments(ScalingConfig, nested_key=None, instantiate=False)
    add_tokenizer_args(p, prepared_too=True)
    p.add_argument("--overwrite", type=bool, default=False, help="Replace rung folders that hold other runs.")
    return p


def cmd_scaling(a: Namespace) -> None:
    from .experiments.scaling import ScalingConfig, check_sweep, render_summary, run_scaling
    from .runtime import resolve_device
    from .train_data import training_data

    cfg = config_from(ScalingConfig, a)
    resolve_device(cfg.device)  # an unavailable device and another sweep's --out: before the data is prepared
    check_sweep(a.out, cfg, a.overwrite)
    data = training_data(a.data, a.tokenizer, a.vocab_size, a.gpt2_dir)
    # absolute, as tlm train records it: `tlm train --resume` on a rung reads its data from there, from any folder
    source = os.path.abspath(a.data) if a.data else "python-stdlib"
    res = run_scaling(cfg, data, a.out, overwrite=a.overwrite, data_label=source)
    _print_results(render_summary(res), res.files)


def _pe_ablation_parser() -> ArgumentParser:
    from .experiments.synthetic_pe import PEAblationConfig

    return _experiment_parser(PEAblationConfig, "runs/pe-ablation", "Positional-encoding ablation: sequence reversal "
                              "learned with each encoding (and none); accuracy table, CSV, JSON and plot in --out.")


def cmd_pe_ablation(a: Namespace) -> None:
    from .experiments.synthetic_pe import PEAblationConfig, render_table, run_pe_ablation

    _check_results(a.out, ("pe_ablation.*",), a.overwrite, "experiment pe-ablation")
    res = run_pe_ablation(config_from(PEAblationConfig, a), a.out)
    _print_results(render_table(res), res.files)


def _speed_parser() -> ArgumentParser:
    from .experiments.speed import SpeedConfig

    return _experiment_parser(SpeedConfig, "runs/speed", "Parallel vs recurrent: training tokens/s and forward latency "
                              "of a Transformer and an LSTM and RNN of matched size against sequence length; table, "
                              "CSV, JSON and plot in --out.")


def cmd_speed(a: Namespace) -> None:
    from .experiments.speed import SpeedConfig, render_table, run_speed

    _check_results(a.out, ("speed.*",), a.overwrite, "experiment speed")
    rows, files = run_speed(config_from(SpeedConfig, a), a.out,
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

    _check_results(a.out, ("long_range.*",), a.overwrite, "experiment long-range")
    def progress(task: str, arch: str, step: int, loss: float) -> None:
        if (step + 1) % 250 == 0:
            log.info("%s %s: step %d, loss %.4f", task, arch, step + 1, loss)

    results, files = run_long_range(config_from(LongRangeConfig, a),
                                    a.out, progress)
    _print_results(render_table(results), files)


EXPERIMENTS: dict[str, tuple[Callable[[], ArgumentParser], Callable[[Namespace], int | None]]] = {
    "scaling": (_scaling_parser, cmd_scaling),
    "pe-ablation": (_pe_ablation_parser, cmd_pe_ablation),
    "speed": (_speed_parser, cmd_speed),
    "long-range": (_long_range_parser, cmd_long_range),
}


def add_experiment_subcommands(p: ArgumentParser) -> None:
    group = p.add_subcommands(dest="name")
    for name, (build, _) in EXPERIMENTS.items():
        q = build()
        group.add_subcommand(name, q, help=q.description)


def cmd_experiment(a: Namespace) -> int | None:
    return EXPERIMENTS[a.name][1](a[a.name])

