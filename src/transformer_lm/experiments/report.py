"""One offline HTML page about several runs and experiments (`tlm report`).

Each path given is a run folder (it holds metrics.jsonl) or an experiment output folder; the run folders inside an
experiment folder (a scaling sweep's rungs) count as runs too. Runs get a summary table and overlaid curves of
training and validation loss against tokens, learning rate and throughput against step, drawn from their
metrics.jsonl. Experiment folders contribute their PNG plots, their CSV tables and the scalar results of their JSON
summaries (a JSON file with an "experiment" key, as `tlm experiment` writes).

The page is self-contained: images are embedded as base64 `data:` URIs, the style sheet is inline, and there is no
script and no external reference, so it opens offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..accounting import count_params
from ..checkpoint import atomic_write_text
from ..config import ModelConfig
from ..errors import ConfigError, DataError
from ..train import read_metrics
from .plotting import figure, literal

MAX_TABLE_ROWS = 200
"""CSV rows shown per table; the rest are counted, not shown."""
_MAX_DEPTH = 3  # how deep inside a folder to look for runs

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0 1em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
.note { color: #666; font-size: .85em; } code { background: #f5f5f5; padding: 0 .2em; }
"""


@dataclass
class RunData:
    """What the report shows of one run folder."""

    path: Path
    label: str
    records: list[dict[str, Any]]
    config: dict[str, Any]

    def model_summary(self) -> tuple[str, int | None]:
        """("4x128 learned", or "4x157 lstm" for a recurrent run; parameters) from config.json, or ("?", None) when
        it cannot be read."""
        try:
            model = ModelConfig.from_dict(self.config["model"])
        except (KeyError, TypeError, ConfigError):
            return "?", None
        kind = model.pos_encoding if model.arch == "transformer" else model.arch
        return f"{model.n_layer}x{model.n_embd} {kind}", count_params(model).total


@dataclass
class ExperimentData:
    """What the report shows of one experiment folder: its plots, tables and JSON summaries."""

    path: Path
    images: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    summaries: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)


def is_run(path: Path) -> bool:
    """Whether `path` is a run folder: training writes metrics.jsonl there (an imported model has none to show)."""
    return (path / "metrics.jsonl").is_file()


def _runs_under(path: Path, depth: int = _MAX_DEPTH) -> list[Path]:
    if is_run(path):
        return [path]
    if depth == 0:
        return []
    return [r for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
            for r in _runs_under(sub, depth - 1)]


def collect(paths: list[str | Path]) -> tuple[list[RunData], list[ExperimentData]]:
    """The runs and experiment folders named by `paths` (runs found up to three folders deep)."""
    if not paths:
        raise ConfigError("name at least one run or experiment folder to report on")
    run_dirs, experiments, seen = [], [], set()
    for p in map(Path, paths):
        if not p.is_dir():
            raise DataError(f"{p} is not a folder; pass run folders or experiment output folders")
        if p.resolve() in seen:  # the same folder named twice (relative and absolute, a symlink): once on the page
            continue
        seen.add(p.resolve())
        if not is_run(p):
            exp = ExperimentData(p, sorted(p.glob("*.png")), sorted(p.glob("*.csv")))
            for j in sorted(p.glob("*.json")):
                try:
                    d = json.loads(j.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if isinstance(d, dict) and "experiment" in d:
                    exp.summaries.append((j, d))
            experiments.append(exp)
        known = {r.resolve() for r in run_dirs}
        run_dirs += [r for r in _runs_under(p) if r.resolve() not in known]
    if not run_dirs and not any(e.images or e.tables or e.summaries for e in experiments):
        raise DataError(f"found no run (metrics.jsonl) and no experiment output (PNG, CSV) in "
                        f"{', '.join(map(str, paths))}")
    return [_read_run(r, run_dirs) for r in run_dirs], experiments


def _read_run(path: Path, all_runs: list[Path]) -> RunData:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    try:
        records = read_metrics(path / "metrics.jsonl")
    except ValueError as e:
        raise DataError(f"{path / 'metrics.jsonl'} is not JSON lines ({e}); is the run folder damaged?") from None
    return RunData(path, _label(path, all_runs), records, config)


def _label(path: Path, all_runs: list[Path]) -> str:
    """The run's folder name, with its parent's name too where two runs share a name."""
    if sum(r.name == path.name for r in all_runs) > 1:
        return f"{path.parent.name}/{path.name}"
    return path.name


# Figures


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in records if x in r and y in r and r[y] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(runs: list[RunData]) -> dict[str, bytes]:
    """PNGs of the runs overlaid: loss (train lines, val markers) against tokens, lr and tokens/s against step."""
    colors = [f"C{i % 10}" for i in range(len(runs))]
    out = {}
    fig = figure(9, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for run, c in zip(runs, colors):
        label = literal(run.label)
        ax.plot(*_series(run.records, "tokens", "loss"), color=c, linewidth=0.8, alpha=0.7, label=f"{label} train")
        ax.plot(*_series(run.records, "tokens", "val_loss"), "o-", color=c, markersize=3, label=f"{label} val")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss: training (lines) and validation (markers)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    out["loss"] = _figure_png(fig)
    for key, ylabel in (("lr", "learning rate"), ("tokens_per_s", "training tokens/s")):
        fig = figure(9, 3.5)
        ax = fig.add_subplot(1, 1, 1)
        for run, c in zip(runs, colors):
            ax.plot(*_series(run.records, "step", key), color=c, linewidth=1, label=literal(run.label))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if key == "tokens_per_s":
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        out[key] = _figure_png(fig)
    return out


# HTML


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if abs(v) >= 1e6 or (v != 0 and abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4f}".rstrip("0").rstrip(".")
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{_png_data_uri(png)}" alt="{html.escape(alt)}">'


def _run_row(run: RunData) -> list[Any]:
    model, params = run.model_summary()
    train_pts = [r for r in run.records if "loss" in r]
    val_pts = [r for r in run.records if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in train_pts if "tokens_per_s" in r]
    last = run.records[-1] if run.records else {}
    return [run.label, model, params if params is not None else "?", last.get("step", "?"), last.get("tokens", "?"),
            train_pts[-1]["loss"] if train_pts else "–", val_pts[-1]["val_loss"] if val_pts else "–",
            val_pts[-1].get("val_bpb", "–") if val_pts else "–",
            sum(speeds) / len(speeds) if speeds else "–", last.get("elapsed", "–")]


def _csv_table(path: Path) -> str:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; convert it or move it out of the folder") from None
    if not rows:
        return '<p class="note">(empty)</p>'
    body = [[_number(v) for v in r] for r in rows[1 : MAX_TABLE_ROWS + 1]]
    more = len(rows) - 1 - len(body)
    note = f'<p class="note">{more} more rows in {html.escape(path.name)}</p>' if more > 0 else ""
    return _table(rows[0], body) + note


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _scalars(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(key, value) of the scalar entries of `d`, nested mappings flattened as a.b; lists left out."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _scalars(v, f"{prefix}{k}.")
        elif v is None or isinstance(v, (str, int, float, bool)):
            out.append((f"{prefix}{k}", v))
    return out


def build_report(paths: list[str | Path], title: str = "transformer-lm report") -> str:
    """The HTML page for `paths` (module docstring)."""
    runs, experiments = collect(paths)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f'<p class="note">Generated {now} from: ' + ", ".join(f"<code>{html.escape(str(p))}</code>"
                                                                  for p in paths) + "</p>"]
    if runs:
        parts.append(f"<h2>Runs ({len(runs)})</h2>")
        parts.append(_table(["run", "model", "params", "steps", "tokens", "train loss", "val loss", "val bpb",
                             "mean tokens/s", "train s"], [_run_row(r) for r in runs]))
        figs = plot_runs(runs)
        parts += [_img(figs["loss"], "loss curves"), "<h3>Learning rate</h3>", _img(figs["lr"], "learning rate"),
                  "<h3>Throughput</h3>", _img(figs["tokens_per_s"], "throughput")]
    for exp in experiments:
        if not (exp.images or exp.tables or exp.summaries):
            continue
        parts.append(f"<h2>{html.escape(exp.path.name or str(exp.path))}</h2>"
                     f'<p class="note"><code>{html.escape(str(exp.path))}</code></p>')
        for path, summary in exp.summaries:
            parts.append(f"<h3>{html.escape(path.name)}</h3>" + _table(["result", "value"], _scalars(summary)))
        for png in exp.images:
            parts.append(f"<h3>{html.escape(png.name)}</h3>" + _img(png.read_bytes(), png.name))
        for table in exp.tables:
            parts.append(f"<h3>{html.escape(table.name)}</h3>" + _csv_table(table))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(paths: list[str | Path], out: str | Path, title: str = "transformer-lm report") -> Path:
    """Write `build_report(paths, title)` to `out` (parent folders created). `out` must be named .html or .htm: so
    an existing file is replaced only when it is an HTML page (a report written before) and a mistyped --out cannot
    overwrite data or a script, and a new page is not named as a file a report reads (report.png or table.csv in an
    experiment folder came back as a broken plot or a table of HTML in the next report). It is replaced only by a
    whole new one (written beside it, then renamed): a full disk or a kill mid-write leaves the old page."""
    out = Path(out)
    if out.is_dir() or out.suffix.lower() not in (".html", ".htm"):
        what = "exists and is not an .html page" if out.exists() else "does not end in .html (the page is HTML)"
        raise ConfigError(f"--out {out} {what}; choose a file name ending in .html")
    text = build_report(paths, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    return out
