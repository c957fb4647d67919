"""An ITI fit as one HTML page: the per-head probe accuracies as a heat map, and the heads ITI shifts.

``intervene iti fit`` writes it as ``OUT/report.html`` beside ``head_accuracies.png``; the demo
embeds :func:`heads_section` in its own page. Self-contained (:mod:`intervene.htmlpage`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from intervene.htmlpage import cards, esc, image, page, table, write_page

HEADS_NOTE = ("Every attention head gets a linear probe on its output at the answer; the colour is that probe's "
              "accuracy on held-out questions. ITI shifts the K best heads (outlined in red) along their "
              "true-minus-false direction by alpha times the spread (sigma) of their activations along it.")


def heads_section(iti: Any, heatmap: str | Path) -> str:
    """The heat map (embedded) and a table of the shifted heads: rank, layer, head, validation accuracy, sigma."""
    val = iti.fit_info_.get("val_accuracy", []) if getattr(iti, "fit_info_", None) else []
    sigma = iti.sigma_.tolist()
    rows = [[rank + 1, layer, head, val[rank] if rank < len(val) else None, sigma[rank]]
            for rank, (layer, head) in enumerate(iti.heads)]
    return (f'<p class="note">{esc(HEADS_NOTE)}</p>' + image(heatmap, "ITI probe accuracy per head")
            + f"<h3>The {len(iti.heads)} heads ITI shifts (alpha = {iti.alpha:g})</h3>"
            + table(["rank", "layer", "head", "validation accuracy", "sigma"], rows, numeric=[0, 1, 2, 3, 4]))


def write_fit_report(out: str | Path, iti: Any, dataset: str, heatmap: str | Path) -> Path:
    """``out/report.html`` for an ``iti fit`` run."""
    info = getattr(iti, "fit_info_", {}) or {}
    body = [f"<h1>ITI fit on {esc(dataset)}</h1>",
            cards([("heads shifted (K)", len(iti.heads)), ("alpha", f"{iti.alpha:g}"),
                   ("best head accuracy", f"{max(info.get('val_accuracy') or [0]):.3f}"),
                   ("questions", info.get("n_questions", "?"))]),
            "<h2>Which heads know the answer</h2>", heads_section(iti, heatmap),
            '<p class="note">Next: <code>intervene iti eval MODEL DIFF DATASET</code> measures the effect on '
            "answers and the cost on neutral text; <code>intervene iti sweep</code> tries several K and alpha.</p>"]
    return write_page(Path(out) / "report.html", page(f"ITI fit on {dataset}", "\n".join(body)))
