"""What a trained model attends to, and how surprised it is, on one text.

`analyze` runs the text through the model once with `return_attentions=True`: the per-layer, per-head attention
weights softmax(QKᵀ/√d) (rows sum to 1 over the visible keys) and the logits, from which the surprisal of each token
is -ln p(token | the tokens before it), in nats (the first token has no prediction). The plotting functions write PNGs
with matplotlib's Agg canvas directly (no pyplot, no global backend switch); `render_table` returns the terminal
rendering as a string. Nothing here prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..model import Transformer
from ..tokenizers import Tokenizer

_VISIBLE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"})


def token_label(piece: str) -> str:
    """A token's text with whitespace made visible, for plots and tables."""
    return piece.translate(_VISIBLE) or "∅"


@dataclass
class AttentionReport:
    """Attention weights and surprisal of one text under one model."""

    ids: list[int]
    tokens: list[str]
    """Each token decoded on its own (a byte of a multi-byte character shows as '\ufffd')."""
    attentions: torch.Tensor
    """(n_layer, n_head, T, T) float32 on the CPU: row t is what query t attends to; zero above the diagonal."""
    surprisal: list[float | None]
    """Per token, -ln p(token | previous tokens) in nats; None for the first token (nothing predicts it)."""
    truncated: bool
    """The text was longer than the context window and only its first block_size tokens were analyzed."""

    @property
    def n_layer(self) -> int:
        return self.attentions.shape[0]

    @property
    def n_head(self) -> int:
        return self.attentions.shape[1]

    @property
    def mean_loss(self) -> float:
        """Mean surprisal in nats over the predicted tokens (the usual next-token loss of the text)."""
        values = [s for s in self.surprisal if s is not None]
        return sum(values) / len(values)

    def check_head(self, layer: int, head: int | None) -> tuple[int, int | None]:
        """Normalize a layer index (negative counts from the end) and validate the head; raise ConfigError."""
        if not -self.n_layer <= layer < self.n_layer:
            raise ConfigError(f"layer {layer} out of range: the model has {self.n_layer} layers "
                              f"(0..{self.n_layer - 1}, or negative from the end)")
        if head is not None and not 0 <= head < self.n_head:
            raise ConfigError(f"head {head} out of range: the model has {self.n_head} heads (0..{self.n_head - 1})")
        return layer % self.n_layer, head

    def head_weights(self, layer: int, head: int | None) -> torch.Tensor:
        """(T, T) weights of one head, or the mean over the layer's heads when `head` is None."""
        layer, head = self.check_head(layer, head)
        w = self.attentions[layer]
        return w.mean(dim=0) if head is None else w[head]

    def top_attended(self, layer: int, head: int | None, k: int = 3) -> list[list[tuple[int, float]]]:
        """For each query position, its k most attended key positions (fewer near the start) with their weights."""
        if k < 1:
            raise ConfigError(f"top-k must be >= 1, got {k}")
        w = self.head_weights(layer, head)
        out = []
        for t in range(w.shape[0]):
            vals, idx = w[t, : t + 1].topk(min(k, t + 1))
            out.append([(int(i), float(v)) for v, i in zip(vals, idx)])
        return out

    def to_dict(self, layer: int, head: int | None, k: int = 3) -> dict[str, Any]:
        """JSON-ready per-token surprisal and top attended tokens of the chosen head."""
        layer, head = self.check_head(layer, head)
        top = self.top_attended(layer, head, k)
        rows = []
        for t, (i, piece, s) in enumerate(zip(self.ids, self.tokens, self.surprisal)):
            rows.append({"pos": t, "id": i, "text": piece, "surprisal_nats": s,
                         "surprisal_bits": None if s is None else s / math.log(2),
                         "top_attended": [{"pos": j, "text": self.tokens[j], "weight": w} for j, w in top[t]]})
        return {"layer": layer, "head": head, "n_layer": self.n_layer, "n_head": self.n_head,
                "mean_loss": self.mean_loss, "truncated": self.truncated, "tokens": rows}


@torch.no_grad()
def analyze(model: Transformer, tokenizer: Tokenizer, text: str) -> AttentionReport:
    """Attention maps and per-token surprisal of `text` (its first block_size tokens)."""
    if not text:
        raise DataError("the text is empty; give the text to analyze, e.g. tlm attention RUN \"def main():\"")
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise DataError(f"{text!r} is {len(ids)} token; give at least 2 tokens so one can be predicted")
    block = model.config.block_size
    truncated = len(ids) > block
    ids = ids[:block]
    device = model.tok_emb.weight.device
    was_training = model.training
    model.eval()
    try:
        out = model(torch.tensor([ids], device=device), return_attentions=True)
    finally:
        model.train(was_training)
    assert out.attentions is not None
    attentions = torch.stack([a[0].float() for a in out.attentions]).cpu()  # (L, nh, T, T)
    logp = F.log_softmax(out.logits[0].float(), dim=-1)  # (T, vocab)
    targets = torch.tensor(ids[1:], device=device)
    nll = -logp[:-1].gather(1, targets[:, None]).squeeze(1).cpu()  # (T-1,): token t+1 predicted at t
    surprisal: list[float | None] = [None, *(float(x) for x in nll)]
    tokens = [tokenizer.decode([i]) for i in ids]
    return AttentionReport(ids, tokens, attentions, surprisal, truncated)


def render_table(report: AttentionReport, layer: int, head: int | None, k: int = 3) -> str:
    """Terminal rendering: per token, its surprisal (nats, bits, a bar) and its k most attended tokens."""
    layer, head = report.check_head(layer, head)
    top = report.top_attended(layer, head, k)
    values = [s for s in report.surprisal if s is not None]
    peak = max(values) or 1.0
    which = f"layer {layer}, " + (f"head {head}" if head is not None else f"mean of {report.n_head} heads")
    lines = [f"{'pos':>4}  {'token':<8} {'nats':>6} {'bits':>6}  {'':<8}  top-{k} attended ({which})"]
    for t, (piece, s) in enumerate(zip(report.tokens, report.surprisal)):
        if s is None:
            loss = f"{'-':>6} {'-':>6}  {'':<8}"
        else:
            bar = "█" * round(s / peak * 8)  # relative to the text's most surprising token
            loss = f"{s:>6.2f} {s / math.log(2):>6.2f}  {bar:<8}"
        attended = "  ".join(f"{_quote(report.tokens[j])}@{j} {w:.2f}" for j, w in top[t])
        lines.append(f"{t:>4}  {_quote(piece):<8} {loss}  {attended}")
    lines.append(f"mean loss {report.mean_loss:.4f} nats/token, perplexity {math.exp(report.mean_loss):.3f}, "
                 f"{len(values)} predicted tokens" + (" (text truncated to the context window)"
                                                      if report.truncated else ""))
    return "\n".join(lines)


def _quote(piece: str) -> str:
    return f"'{token_label(piece)}'"


# Plots

_MAX_LABELS = 64  # beyond this many tokens, axis labels become unreadable: show positions instead


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # attaches the Agg canvas: PNG output without pyplot or a display
    return fig


def plot_attention_grid(report: AttentionReport, path: str | Path) -> Path:
    """Every layer (rows) × head (columns) attention map as one PNG."""
    L, H = report.n_layer, report.n_head
    size = 1.8
    fig = _figure(max(4.0, H * size + 1), max(3.0, L * size + 0.8))
    axes = fig.subplots(L, H, squeeze=False)
    for layer in range(L):
        for head in range(H):
            ax = axes[layer][head]
            ax.imshow(report.attentions[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    fig.suptitle(f"attention weights (rows: query, columns: key), {len(report.ids)} tokens", fontsize=9)
    return _save(fig, path)


def plot_attention_head(report: AttentionReport, layer: int, head: int | None, path: str | Path) -> Path:
    """One head's map (or its layer's mean over heads) with token labels on both axes."""
    layer, head = report.check_head(layer, head)
    w = report.head_weights(layer, head).numpy()
    T = w.shape[0]
    side = min(14.0, max(4.0, 0.25 * T + 2))
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    if T <= _MAX_LABELS:
        labels = [token_label(p) for p in report.tokens]
        ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(T), labels, fontsize=7)
    ax.set_xlabel("key (attended token)")
    ax.set_ylabel("query (attending token)")
    ax.set_title(f"layer {layer}, " + (f"head {head}" if head is not None else "mean over heads"))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def plot_surprisal(report: AttentionReport, path: str | Path) -> Path:
    """Per-token surprisal as bars, labelled by token."""
    T = len(report.ids)
    fig = _figure(min(20.0, max(5.0, 0.22 * T + 1.5)), 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(T), [s if s is not None else 0.0 for s in report.surprisal], color="tab:red")
    if T <= _MAX_LABELS * 2:
        ax.set_xticks(range(T), [token_label(p) for p in report.tokens], rotation=90, fontsize=7)
    else:
        ax.set_xlabel("token position")
    ax.set_ylabel("surprisal (nats)")
    ax.axhline(report.mean_loss, color="black", linewidth=0.8, linestyle="--", label=f"mean {report.mean_loss:.2f}")
    ax.legend(fontsize=8)
    ax.set_title("per-token loss: -ln p(token | previous tokens)")
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_report(report: AttentionReport, out: str | Path, layer: int = -1, head: int | None = 0, k: int = 3,
                 extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write attention_grid.png, attention_L{l}_H{h}.png (H "mean" when head is None), surprisal.png and
    attention.json (per-token surprisal and top-k attended tokens, plus `extra`) into `out`."""
    import json

    layer, head = report.check_head(layer, head)
    table = report.to_dict(layer, head, k)  # first: a bad k is refused before any file is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    zoom = out / f"attention_L{layer}_H{'mean' if head is None else head}.png"
    files = {"grid": plot_attention_grid(report, out / "attention_grid.png"),
             "head": plot_attention_head(report, layer, head, zoom),
             "surprisal": plot_surprisal(report, out / "surprisal.png")}
    files["json"] = out / "attention.json"
    data = {**(extra or {}), **table, "files": {k_: str(p) for k_, p in files.items()}}
    files["json"].write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return files
