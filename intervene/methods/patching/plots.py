"""Heat maps for patching sweeps and causal traces (matplotlib's Agg canvas; pyplot's state is never touched)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_grid(values: torch.Tensor, rows: Sequence[str], cols: Sequence[str], path: str | Path, title: str,
              colorbar: str, cmap: str = "RdBu_r", center: float | None = 0.0, vmin: float | None = None) -> Path:
    """``values`` ``[rows, cols]`` as a heat map with labelled axes; a diverging map centred on ``center``."""
    v = values.detach().float().cpu()
    fig = _figure(max(4.0, 0.55 * len(cols) + 2.5), max(2.5, 0.32 * len(rows) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    kw: dict[str, Any] = {"cmap": cmap, "aspect": "auto", "interpolation": "nearest"}
    finite = v[torch.isfinite(v)]
    if center is not None and finite.numel():
        span = float((finite - center).abs().max().clamp_min(1e-9))
        kw.update(vmin=center - span, vmax=center + span)
    elif vmin is not None:
        kw.update(vmin=vmin)
    im = ax.imshow(v.numpy(), **kw)
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), labels=list(rows), fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=colorbar, shrink=0.9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
_TITLES = {"hidden": "single restored layer (block output)", "mlp": "restored MLP, window {w}",
           "attn": "restored attention, window {w}"}


def plot_trace(scores: dict[str, torch.Tensor], rows: Sequence[str], low: float, path: str | Path, title: str,
               window: int, label: str = "p(answer)") -> Path:
    """Causal-tracing heat maps, one per kind (rows = tokens or buckets, columns = layers), as ROME draws them."""
    kinds = [k for k in ("hidden", "mlp", "attn") if k in scores]
    n_layers = int(next(iter(scores.values())).shape[1])
    fig = _figure(max(7.0, 2.6 * len(kinds) + 0.12 * n_layers * len(kinds)), max(2.6, 0.3 * len(rows) + 1.6))
    for i, kind in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), i + 1)
        v = scores[kind].detach().float().cpu()
        finite = v[torch.isfinite(v)]
        vmin = low if label != "AIE" else min(0.0, float(finite.min()) if finite.numel() else 0.0)
        im = ax.imshow(v.numpy(), cmap=_CMAPS[kind], aspect="auto", interpolation="nearest", vmin=vmin)
        ax.set_xticks(range(n_layers))
        ax.set_xlabel("layer")
        ax.set_yticks(range(len(rows)), labels=list(rows) if i == 0 else [""] * len(rows), fontsize=7)
        ax.set_title(_TITLES[kind].format(w=window), fontsize=8)
        fig.colorbar(im, ax=ax, label=label, shrink=0.85)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
