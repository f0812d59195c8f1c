"""Matplotlib figures for the experiments, drawn on the Agg canvas directly: PNG files without pyplot, a display or
a global backend switch, so a library call never changes the caller's matplotlib state."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def figure(width: float, height: float) -> Any:
    """A matplotlib Figure of `width` × `height` inches with an Agg canvas attached."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def literal(text: str) -> str:
    """`text` as matplotlib draws it literally in a title or legend: a `$` would start mathtext (a run named `a$b$`
    drawn as math, one named `$\\q$` a parse error), and a label starting with `_` is left out of legends (a run
    folder named `_baseline` had curves and no entry), so such a text gets a leading space."""
    return (" " + text if text.startswith("_") else text).replace("$", r"\$")


def save_png(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Lay out `fig` and write it to `path` as PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path
