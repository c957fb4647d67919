"""ITI figures: a heatmap of per-head probe accuracy and the truthfulness vs. cross-entropy trade-off.

Figures are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas, so nothing touches
pyplot's global state or the user's backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def plot_head_accuracies(accuracy: torch.Tensor, path: str | Path, top_heads: Sequence[tuple[int, int]] = (),
                         title: str = "ITI probe accuracy per head (validation)") -> Path:
    """Heatmap of ``accuracy`` ``[L, H]`` (layers on the y axis); selected heads are outlined."""
    acc = torch.as_tensor(accuracy).float().cpu()
    n_layers, n_heads = acc.shape
    fig = _figure(min(14.0, max(5.5, 2.5 + 0.25 * n_heads)), min(12.0, max(4.0, 1.8 + 0.22 * n_layers)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(acc.numpy(), origin="lower", aspect="auto", cmap="viridis", vmin=max(0.0, float(acc.min())),
                   vmax=float(acc.max()))
    for layer, head in top_heads:
        ax.add_patch(_rect(head, layer))
    if len(top_heads):
        ax.legend(handles=[_rect(0, 0, label=f"selected heads (the top {len(top_heads)}, shifted by ITI)")],
                  loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, frameon=False)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    if n_heads <= 16:  # integer ticks on small models; matplotlib's defaults read better on large ones
        ax.set_xticks(range(n_heads))
    if n_layers <= 16:
        ax.set_yticks(range(n_layers))
    fig.colorbar(im, ax=ax, label="probe accuracy (validation)")
    out = Path(path)
    fig.savefig(out, bbox_inches="tight")
    return out


def _rect(x: int, y: int, label: str | None = None) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2, label=label)


def plot_tradeoff(rows: Sequence[Mapping[str, Any]], path: str | Path, truth_key: str, ce_key: str = "ce",
                  title: str = "ITI: truthfulness vs. cross-entropy") -> Path:
    """One line per K (``num_heads``) through its α values: ``truth_key`` against ``ce_key``."""
    fig = _figure(6.4, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    base = [r for r in rows if not r.get("num_heads")]
    for k in sorted({int(r["num_heads"]) for r in rows if r.get("num_heads")}):
        pts = sorted((r for r in rows if r.get("num_heads") == k), key=lambda r: float(r["alpha"]))
        xs = [float(r[ce_key]) for r in pts]
        ys = [float(r[truth_key]) for r in pts]
        ax.plot(xs, ys, marker="o", label=f"K={k}")
        for r, x, y in zip(pts, xs, ys):
            ax.annotate(f"α={float(r['alpha']):g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for r in base:
        ax.scatter([float(r[ce_key])], [float(r[truth_key])], marker="*", s=120, color="black", label="base", zorder=3)
    ax.set_xlabel(f"{ce_key} on reference text (nats/token)")
    ax.set_ylabel(truth_key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out
