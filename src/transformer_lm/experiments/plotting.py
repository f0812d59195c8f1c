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


def save_png(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Lay out `fig` and write it to `path` as PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path
