"""Self-contained static HTML pages: one style sheet, tables that sort, tokens shaded by a value.

Used by the SAE latent dashboard (:mod:`intervene.features.dashboard`) and the run reports of the
demo and ITI. Every page is one file with its CSS and script inline and images embedded as data
URIs, so it opens from disk, offline, without a server, and never asks the network for anything.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2330;
       background: #fafbfc; }
main { max-width: 1100px; margin: 0 auto; padding: 16px 24px 48px; }
nav { font-size: 13px; margin-bottom: 8px; } nav a { margin-right: 12px; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 17px; margin: 24px 0 8px; }
a { color: #1f5fbf; text-decoration: none; } a:hover { text-decoration: underline; }
.muted { color: #687083; } .note { color: #687083; font-size: 13px; max-width: 900px; }
table { border-collapse: collapse; background: #fff; font-size: 13px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e4e7ec; text-align: left; vertical-align: top; }
th { background: #f0f2f5; position: sticky; top: 0; }
th.sortable { cursor: pointer; user-select: none; } th.sortable::after { content: " \\2195"; color: #a0a7b4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0 4px; }
.card { background: #fff; border: 1px solid #e4e7ec; border-radius: 6px; padding: 6px 12px; }
.card b { display: block; font-size: 18px; }
.ctx { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; background: #fff;
       border: 1px solid #e4e7ec; border-radius: 4px; padding: 4px 8px; margin: 3px 0; white-space: pre-wrap;
       word-break: break-word; }
.ctx .max { float: right; color: #687083; font-size: 12px; margin-left: 12px; }
.tok { border-radius: 2px; } .special { color: #a0a7b4; }
.logits { display: flex; gap: 32px; flex-wrap: wrap; }
.bar { display: inline-block; height: 9px; background: #4c78a8; vertical-align: middle; margin-right: 6px; }
.bar.neg { background: #e45756; }
img.fig { max-width: 100%; background: #fff; border: 1px solid #e4e7ec; border-radius: 4px; }
"""

# Click a header to sort by it (numbers numerically, text alphabetically; again to reverse). A cell's
# data-v attribute, when present, is what it sorts by.
SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.classList.add("sortable");
    th.addEventListener("click", function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.dataset.dir !== "asc";
      th.dataset.dir = asc ? "asc" : "desc";
      function key(row) {
        var cell = row.cells[col];
        var v = cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent.trim();
        var n = parseFloat(v);
        return isNaN(n) ? v.toLowerCase() : n;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (typeof x !== typeof y) { return (typeof x === "number" ? -1 : 1) * (asc ? 1 : -1); }
        return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def esc(value: Any) -> str:
    """HTML-escaped text of ``value``."""
    return html.escape(str(value), quote=True)


def page(title: str, body: str, nav: Sequence[tuple[str, str]] = ()) -> str:
    """A complete HTML document: ``nav`` is ``[(href, label)]`` shown above the body."""
    links = "".join(f'<a href="{esc(h)}">{esc(label)}</a>' for h, label in nav)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n'
            f'{"<nav>" + links + "</nav>" if links else ""}\n{body}\n</main>\n<script>{SORT_JS}</script>\n'
            f'</body>\n</html>\n')


def cards(items: Sequence[tuple[str, Any]]) -> str:
    """A row of headline numbers: ``[(label, value)]``."""
    return '<div class="cards">' + "".join(
        f'<div class="card"><b>{esc(v)}</b><span class="muted">{esc(k)}</span></div>' for k, v in items) + "</div>"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], sortable: bool = True,
          numeric: Sequence[int] = ()) -> str:
    """An HTML table. Cells are escaped unless given as ``Raw``; columns in ``numeric`` align right."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ' class="num"' if i in numeric else ""
            sort = f' data-v="{esc(cell.sort)}"' if isinstance(cell, Raw) and cell.sort is not None else ""
            text = cell.html if isinstance(cell, Raw) else esc(_fmt(cell))
            cells.append(f"<td{cls}{sort}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls = ' class="sortable"' if sortable else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>"


class Raw:
    """A table cell holding HTML (not escaped), optionally with the value it sorts by."""

    def __init__(self, html_text: str, sort: Any = None) -> None:
        self.html, self.sort = html_text, sort


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3f}"
    return str(v)


def shade(strings: Sequence[str], values: Sequence[float], vmax: float, special: Sequence[bool] = ()) -> str:
    """Tokens as spans shaded by ``value / vmax`` (orange); each span's title gives its value."""
    out = []
    for i, (s, v) in enumerate(zip(strings, values)):
        text = esc(s.replace("\n", "\u21b5\n"))
        cls = "tok special" if i < len(special) and special[i] else "tok"
        if v > 0 and vmax > 0:
            a = min(1.0, float(v) / vmax)
            out.append(f'<span class="{cls}" style="background: rgba(255, 140, 0, {0.12 + 0.78 * a:.2f})" '
                       f'title="{float(v):.3g}">{text}</span>')
        else:
            out.append(f'<span class="{cls}">{text}</span>')
    return "".join(out)


def bars(items: Sequence[tuple[str, float]], scale: float, negative: bool = False) -> str:
    """A list of labelled horizontal bars (``[(label, value)]``), longest = ``scale``."""
    cls = "bar neg" if negative else "bar"
    rows = [f'<div><span class="{cls}" style="width: {int(120 * abs(v) / scale) if scale else 0}px"></span>'
            f'<code>{esc(label)}</code> <span class="muted">{v:+.3f}</span></div>' for label, v in items]
    return "".join(rows)


def image(path: str | Path, alt: str) -> str:
    """An ``<img>`` with the PNG at ``path`` embedded (the page stays one file)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img class="fig" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def write_page(path: str | Path, document: str) -> Path:
    """Write ``document`` to ``path`` (UTF-8; parent folders created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    return out
