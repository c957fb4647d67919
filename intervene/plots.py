"""Shared plotting helpers: matplotlib with the Agg backend, figures saved as PNG files.

matplotlib is imported inside each function (never at import time), and we never touch the
global backend of a running interactive session: figures are built with the object API on an
Agg canvas and closed after saving.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _figure(width: float = 6.4, height: float = 4.0) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def plot_metric_by_layer(
    series: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    metric: str = "auroc",
    title: str | None = None,
    chance: float | None = 0.5,
    styles: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Line plot of ``metric`` by layer, one line per series, with a shaded ``metric_lower..upper`` band.

    Args:
        series: name -> rows (dicts with ``layer``, ``metric`` and optionally ``{metric}_lower`` /
            ``{metric}_upper``), e.g. the rows of ``eval.csv``.
        path: the PNG to write (parent folders are created).
        chance: draw a dotted line at this value (``None``: none).
        styles: name -> extra ``Axes.plot`` keywords for that series (e.g. ``{"linestyle": "--"}``).
    """
    fig, ax = _figure()
    for name, rows in series.items():
        rows = sorted(rows, key=lambda r: float(r["layer"]))
        xs = [float(r["layer"]) for r in rows]
        ys = [float(r[metric]) for r in rows]
        style = {"marker": "o", "markersize": 4, **((styles or {}).get(name) or {})}
        (line,) = ax.plot(xs, ys, label=name, clip_on=False, zorder=3, **style)
        lo, hi = f"{metric}_lower", f"{metric}_upper"
        if rows and lo in rows[0] and hi in rows[0]:
            ax.fill_between(xs, [float(r[lo]) for r in rows], [float(r[hi]) for r in rows],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(x=0.06)  # the first and last layers' points stay off the frame
    ax.set_xlabel("layer")
    ax.set_ylabel(metric.upper() if metric == "auroc" else metric)
    if metric in ("auroc", "acc", "cal_acc", "accuracy"):
        # headroom above 1.0, so points at a perfect score are not drawn on the frame
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.05)
        ax.set_yticks([t / 10 for t in range(0, 11, 2)])
    if title:
        ax.set_title(title)
    if len(series) > 1 or chance is not None:
        # below the axes: inside, it would hide the curves that sit at 1.0
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(3, len(series) + 1),
                  frameon=False)
    ax.grid(alpha=0.3)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", bbox_inches="tight")
    return out


def plot_run(run: str | Path, output: str | Path | None = None, metric: str = "auroc") -> Path:
    """AUROC by layer of an elicit run: ``eval.csv`` (held out) and every ``eval_<name>.csv`` (transfer)."""
    import json

    from intervene.elicit import read_csv

    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"no such run directory: {run} (an elicit run folder, written by `intervene elicit`)")
    if not (run / "eval.csv").is_file():
        raise FileNotFoundError(f"{run} has no eval.csv: not an elicit run")
    series = {"held-out": read_csv(run / "eval.csv")}
    for extra in sorted(run.glob("eval_*.csv")):
        series[extra.stem.removeprefix("eval_")] = read_csv(extra)
    title = None
    if (run / "config.json").is_file():
        cfg = json.loads((run / "config.json").read_text())
        title = f"{cfg.get('net')} on {cfg.get('dataset')}" + (f" ({cfg['character']})" if cfg.get("character") else "")
    return plot_metric_by_layer(series, output or run / f"{metric}_by_layer.png", metric, title)
