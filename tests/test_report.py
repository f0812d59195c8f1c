"""`tlm report` (issue 6): a self-contained HTML page with the runs' names, embedded images and tables, and no
external references."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import make_corpus
from transformer_lm.accounting import count_params
from transformer_lm.cli import main
from transformer_lm.config import ModelConfig, TrainConfig
from transformer_lm.experiments import report
from transformer_lm.experiments.plotting import figure, save_png
from transformer_lm.model import Transformer
from transformer_lm.train import train
from transformer_lm.train_data import training_data


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    corpus = root / "corpus.txt"
    corpus.write_text(make_corpus(), encoding="utf-8")
    data = training_data(corpus, "char")
    runs = {}
    for name, width in (("run-narrow", 16), ("run-wide", 32)):
        cfg = ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=width)
        train(cfg, TrainConfig(batch_size=4, max_iters=6, eval_interval=3, eval_batches=1, log_interval=2,
                               warmup_iters=2), data, root / name, progress=False)
        runs[name] = root / name
    exp = root / "my-experiment"  # an experiment folder: a plot, a table and a JSON summary, plus a run inside
    exp.mkdir()
    fig = figure(3, 2)
    fig.add_subplot(1, 1, 1).plot([1, 2], [3, 4])
    save_png(fig, exp / "result.png")
    (exp / "table.csv").write_text("encoding,accuracy\nrope,0.987\nnone,<b>0.1</b>\n")
    (exp / "summary.json").write_text(json.dumps({"experiment": "demo", "fit": {"alpha": 0.321}, "skip": [1, 2]}))
    (exp / "ignored.json").write_text("[1, 2]")
    train(ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=16), TrainConfig(batch_size=4, max_iters=2,
          eval_batches=1, warmup_iters=1), data, exp / "runs" / "inner", progress=False)
    return {**runs, "exp": exp}


def test_report_is_self_contained(folders: dict[str, Path], tmp_path: Path, capsys):
    out = tmp_path / "r" / "report.html"
    assert main(["report", str(folders["run-narrow"]), str(folders["run-wide"]), str(folders["exp"]), "--out",
                 str(out), "--title", "My <report>"]) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    for name in ("run-narrow", "run-wide", "inner", "my-experiment", "result.png", "table.csv"):
        assert name in page, name
    assert "My &lt;report&gt;" in page and "&lt;b&gt;0.1&lt;/b&gt;" in page  # text is escaped
    assert "0.987" in page and "fit.alpha" in page and "0.321" in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4  # loss, lr, throughput, and the experiment's plot
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert base64.b64encode((folders["exp"] / "result.png").read_bytes()).decode() in images
    assert not re.search(r"https?://", page)
    assert "<script" not in page and "<link" not in page and re.search(r"<img[^>]+src=\"(?!data:)", page) is None


def test_report_run_table(folders: dict[str, Path]):
    runs, experiments = report.collect([folders["run-wide"], folders["exp"]])
    assert [r.label for r in runs] == ["run-wide", "inner"] and [e.path.name for e in experiments] == ["my-experiment"]
    twice = report.collect([folders["run-wide"], folders["exp"], folders["run-wide"] / ".." / "run-wide",
                            folders["exp"].resolve()])  # the same folders named another way: listed once
    assert [r.label for r in twice[0]] == ["run-wide", "inner"] and len(twice[1]) == 1
    row = report._run_row(runs[0])
    params = Transformer(ModelConfig.from_dict(runs[0].config["model"])).num_params()
    assert row[:4] == ["run-wide", "1x32 learned", params, 6]
    final_val = [r for r in runs[0].records if "val_loss" in r][-1]["val_loss"]
    assert row[6] == final_val
    lstm = ModelConfig(arch="lstm", n_layer=2, n_embd=24, block_size=16)  # no positional encoding to name
    assert report.RunData(Path("r"), "r", [], {"model": lstm.to_dict()}).model_summary() == ("2x24 lstm",
                                                                                            count_params(lstm).total)


def test_report_bad_input(tmp_path: Path, capsys, folders: dict[str, Path]):
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r.html")]) == 2
    assert "not a folder" in capsys.readouterr().err
    run = tmp_path / "run"  # a metrics line that is JSON but no record, a CSV that is not UTF-8: one line each
    shutil.copytree(folders["run-narrow"], run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n")
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 2
    assert "is not JSON lines" in capsys.readouterr().err
    (tmp_path / "exp").mkdir()
    shutil.copytree(folders["run-wide"], tmp_path / "exp" / "run")
    (tmp_path / "exp" / "t.csv").write_bytes(b"a,b\n\xff\xfe,1\n")
    assert main(["report", str(tmp_path / "exp"), "--out", str(tmp_path / "r.html")]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 2
    assert "found no run" in capsys.readouterr().err
    exp = shutil.copytree(folders["exp"], tmp_path / "exp2")
    for name in ("report.png", "report.csv", "report"):  # an HTML page the next report would read as a plot or table
        assert main(["report", str(exp), "--out", str(exp / name)]) == 2
        err = capsys.readouterr().err
        assert "does not end in .html" in err and err.count("\n") == 1 and not (exp / name).exists()


def test_run_names_are_drawn_literally_in_every_legend(monkeypatch: pytest.MonkeyPatch):
    """A run folder named `_baseline` had curves but no legend entry (matplotlib hides labels starting with `_`), and
    one named with `$…$` was drawn as math, or with `$\\q$` stopped the report with a mathtext parse error."""
    records = [{"step": s, "tokens": 10 * s, "loss": 2.0 / s, "val_loss": 2.5 / s, "lr": 1e-3, "tokens_per_s": 9.0}
               for s in (1, 2)]
    names = ["_baseline", "a$b$", "cost$\\q$"]
    figures = []
    monkeypatch.setattr(report, "_figure_png", lambda fig: figures.append(fig) or b"")
    report.plot_runs([report.RunData(Path(n), n, records, {}) for n in names])
    shown = [[t._preprocess_math(t.get_text()) for t in fig.axes[0].get_legend().get_texts()] for fig in figures]
    drawn = [" _baseline", "a$b$", "cost$\\q$"]  # leading space: matplotlib 3.7 drops `_baseline`
    assert shown[0] == [(f"{n} {kind}", False) for n in drawn for kind in ("train", "val")]  # loss: train and val
    assert shown[1] == shown[2] == [(n, False) for n in drawn]  # learning rate, throughput
    for fig in figures:
        fig.canvas.draw()  # renders: no mathtext left to parse


def test_a_failed_write_leaves_the_previous_report(folders: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch):
    """The page was written over the old one in place: a write that failed partway (a full disk, a kill) left a
    truncated page and no old one."""
    out = tmp_path / "report.html"
    report.write_report([folders["run-wide"]], out)
    before = out.read_text(encoding="utf-8")
    monkeypatch.setattr(report, "build_report", lambda paths, title: "<p>partial</p>" * 10_000 + "\ud800")
    with pytest.raises(UnicodeEncodeError):  # fails after the first blocks went to disk
        report.write_report([folders["run-wide"]], out)
    assert out.read_text(encoding="utf-8") == before
