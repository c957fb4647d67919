"""Reading the figures the docs report, and checking a measurement against one.

A *figure* is a number a reader is told was measured: a number in a results table or in the prose of
``README.md``, ``docs/patching.md`` or the demo model's card. :mod:`tests.figures` names each one with a
stable id (``readme.demo.iti_bob.addition.after``) and the test that guards it. This module

* parses the documents: tables (a row is found by its first cells, every number in its other cells is a
  figure) and prose (a registered regex claims a span; its named groups are figures, the other numbers
  written into the pattern are settings it pins); fenced code is skipped except for its ``#`` comments;
* lists the *figure-like* numbers of the prose (a decimal, a ratio ``3.6x``, a percentage, ``1e-5``) that
  no registered pattern claims, so that :mod:`tests.test_figures` fails on a new claim without a guard;
* gives :func:`check`, which a guarding test calls with its measurement and a :class:`Bound` that says
  how far the measurement may sit from the reported value and why (its sampling noise, usually two
  standard errors). The reported value is read from the document at that moment: a test checks what the
  docs say, never a copy of it.

Set ``FIGURES_LOG=path.jsonl`` to append one line per check (id, reported, measured, bound, test).
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.figures import (
    JSON_FIGURES,
    MEASURED,
    MEASURED_GUARD,
    PROSE,
    SAE_CFG,
    SOURCES,
    TABLES,
    Prose,
    Table,
)

ROOT = Path(__file__).resolve().parents[1]
# A figure-like number in prose: a decimal (not a dotted version or a name such as layers.0), scientific
# notation, a ratio (3.6x, 2.0×) or a percentage.
FIGURE_LIKE = re.compile(r"(?<![\w.])(?:\d+\.\d+(?:e-?\d+)?(?!\.?\d)|\d+e-\d+|\d+(?:\.\d+)?(?=\s?[x×%](?![\w]))"
                         r"(?![\w.]*\.\d))")
CELL_NUMBER = re.compile(r"(?<![\w.])[+−-]?\d+(?:\.\d+)?(?:e-?\d+)?|(?<=L)\d+")
INLINE_CODE = re.compile(r"`[^`]*`")


@dataclass(frozen=True)
class Reported:
    """A figure as a document states it."""

    id: str
    value: float
    text: str
    source: str
    where: str  # the row label or the prose it sits in
    guard: str  # what guards it (tests/figures.py)

    @property
    def half_unit(self) -> float:
        """Half a unit of the last digit written (``1.000``: 0.0005): the rounding the text hides."""
        mantissa = self.text.lstrip("+−-").split("e")[0]
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        scale = 10 ** int(self.text.split("e")[1]) if "e" in self.text else 1
        return 0.5 * 10 ** -decimals * scale


@dataclass(frozen=True)
class Bound:
    """How far a measurement may sit from a reported figure, and why (written beside the check)."""

    tol: float
    why: str


# ---- bounds from the measurement's noise -------------------------------------------------------------
def binomial(p: float, n: int) -> Bound:
    """An accuracy (or IIA) on ``n`` items: two binomial standard errors; when ``p`` is 0 or 1 the standard
    error vanishes, and 3/n (the rule of three: the 95% bound on a rate after 0 of n events) stands in."""
    se = math.sqrt(max(p * (1 - p), 0.0) / n)
    return Bound(max(2 * se, 3 / n), f"2 SE of an accuracy on n={n} (floor 3/n)")


def auroc(a: float, n_pos: int, n_neg: int) -> Bound:
    """An AUROC on ``n_pos`` / ``n_neg`` examples: two Hanley-McNeil (1982) standard errors, floor
    3/min(n_pos, n_neg) (one example ranked past every other moves it by 1/n)."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return Bound(max(2 * math.sqrt(max(var, 0.0)), 3 / min(n_pos, n_neg)),
                 f"2 Hanley-McNeil SE of an AUROC on {n_pos}/{n_neg} (floor 3/n)")


def pgr(a: float, floor: float, ceiling: float, n_pos: int, n_neg: int) -> Bound:
    """PGR = (a - floor) / (ceiling - floor): the three AUROC bounds propagated (delta method, independent)."""
    gap = ceiling - floor
    sa, sf, sc = (auroc(x, n_pos, n_neg).tol / 2 for x in (a, floor, ceiling))
    se = math.sqrt(sa ** 2 + (sf * (ceiling - a) / gap) ** 2 + (sc * (a - floor) / gap) ** 2) / abs(gap)
    return Bound(2 * se, f"2 SE of a PGR, AUROC SEs on {n_pos}/{n_neg} propagated over a gap of {gap:.3f}")


def mean_of(values: Iterable[float], what: str, floor: float = 0.0) -> Bound:
    """A mean over items (texts, pairs, facts): two standard errors of the mean."""
    xs = [float(v) for v in values]
    n = len(xs)
    mu = sum(xs) / n
    se = math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n) if n > 1 else 0.0
    return Bound(max(2 * se, floor), f"2 SE of a mean over {n} {what}" + (f" (floor {floor:g})" if floor else ""))


def ci95(lower: float, upper: float, what: str) -> Bound:
    """A figure reported with a 95% interval: its half-width."""
    return Bound((upper - lower) / 2, f"half-width of the 95% interval of {what}")


def bootstrap(stat: dict, what: str) -> Bound:
    """A mean reported with a percentile-bootstrap 95% interval (``{"estimate", "lower", "upper", "n"}``): its
    half-width, floor 3/n (a mean of 0/1 scores that is 0 or 1 has a zero-width interval)."""
    return Bound(max((stat["upper"] - stat["lower"]) / 2, 3 / stat["n"]),
                 f"half-width of the 95% bootstrap interval over {stat['n']} {what} (floor 3/n)")


def spearman(rho: float, n: int) -> Bound:
    """A rank correlation over ``n`` cells: two Fisher-z standard errors mapped back, (1 - rho^2)·2/sqrt(n-3)."""
    return Bound(2 * (1 - rho * rho) / math.sqrt(max(n - 3, 1)), f"2 Fisher-z SE of a Spearman rho on n={n}")


def exact(why: str) -> Bound:
    """A figure with no sampling noise (a count, a log entry, a closed-form quantity): the rounding only."""
    return Bound(0.0, why)


# ---- reading the documents ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Parsed:
    prose: str  # whitespace-normalised prose, inline code kept, fenced code reduced to its comments
    tables: list[tuple[list[str], list[list[str]]]]  # (header cells, rows of cells)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


@functools.cache
def parse(source: str) -> Parsed:
    prose: list[str] = []
    tables: list[tuple[list[str], list[list[str]]]] = []
    fence = False
    block: list[str] = []
    for line in (ROOT / source).read_text().splitlines() + [""]:
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if fence:
            hashes = [m.start() for m in re.finditer(r"(?:^|\s)#", line)]
            if hashes:
                prose.append(line[hashes[0]:].strip() + " ¶")
            continue
        if line.lstrip().startswith("|"):
            block.append(line)
            continue
        if block:
            tables.append((_cells(block[0]), [_cells(r) for r in block[2:]]))
            block = []
        prose.append(line)
    text = re.sub(r"<!--.*?-->", " ", " ".join(prose), flags=re.S)
    return Parsed(re.sub(r"\s+", " ", text), tables)


def _numbers(cell: str) -> list[str]:
    return [m.group().replace("−", "-") for m in CELL_NUMBER.finditer(INLINE_CODE.sub(" ", cell))]


def _table_figures(t: Table, problems: list[str]) -> dict[str, Reported]:
    out: dict[str, Reported] = {}
    found = [(h, rows) for h, rows in parse(t.source).tables if " | ".join(h).startswith(t.header)]
    if not found:
        problems.append(f"{t.source}: no table whose header starts with {t.header!r}")
        return out
    header = found[0][0]
    columns = t.columns or tuple(re.sub(r"\W+", "_", h.lower()).strip("_") for h in header[t.key_cells:])
    for cells in (r for _, rows in found for r in rows):
        label = " | ".join(cells[:t.key_cells])
        match = [r for r in t.rows if label.startswith(r.label)]
        if len(match) != 1:
            problems.append(f"{t.source}: table row {label!r} matches {len(match)} registered rows")
            continue
        row = match[0]
        for col, cell in zip(columns, cells[t.key_cells:]):
            nums = _numbers(cell)
            names = row.parts.get(col, row.parts.get("*", ())) if isinstance(row.parts, dict) else row.parts
            if not nums and not cell.strip(" —-"):
                continue
            if len(nums) != len(names):
                problems.append(f"{t.source}: row {label!r}, column {col}: {cell!r} has {len(nums)} numbers, "
                                f"the registry names {len(names)}")
                continue
            for name, text in zip(names, nums):
                fid = f"{row.fig}.{col}" + (f".{name}" if name else "")
                out[fid] = Reported(fid, float(text), text, t.source, label, row.guard)
    return out


def _prose_figures(p: Prose, problems: list[str]) -> tuple[dict[str, Reported], list[tuple[int, int]]]:
    text = parse(p.source).prose
    matches = list(re.finditer(p.pattern, text))
    if len(matches) != 1:
        problems.append(f"{p.source}: the pattern of {p.fig or p.guard!r} matches {len(matches)} times: {p.pattern}")
        return {}, []
    m = matches[0]
    out = {}
    for name, value in m.groupdict().items():
        if value is not None:
            fid = f"{p.fig}.{name}"
            out[fid] = Reported(fid, float(value.replace("−", "-").replace(",", "")), value, p.source, m.group(),
                                p.guard)
    return out, [m.span()]


def unclaimed(source: str, spans: Sequence[tuple[int, int]]) -> list[str]:
    """Figure-like numbers of ``source``'s prose outside every claimed span and outside inline code."""
    text = parse(source).prose
    skip = [m.span() for m in INLINE_CODE.finditer(text)] + list(spans)
    return [f"{m.group()!r} in ...{text[max(0, m.start() - 60):m.end() + 30]}..."
            for m in FIGURE_LIKE.finditer(text) if not any(a <= m.start() < b for a, b in skip)]


@functools.cache
def index() -> tuple[dict[str, Reported], tuple[str, ...]]:
    """Every registered figure the documents report, and the problems met reading them."""
    problems: list[str] = []
    figures: dict[str, Reported] = {}
    spans: dict[str, list[tuple[int, int]]] = {}
    for t in TABLES:
        figures.update(_table_figures(t, problems))
    for p in PROSE:
        found, claimed = _prose_figures(p, problems)
        figures.update(found)
        spans.setdefault(p.source, []).extend(claimed)
    cfg = json.loads((ROOT / SAE_CFG).read_text())
    for fid, (key, guard) in JSON_FIGURES.items():
        value = functools.reduce(lambda d, k: d[k], key.split("."), cfg)
        figures[fid] = Reported(fid, float(value), str(value), SAE_CFG, key, guard)
    for source in SOURCES:
        registered = {t.header for t in TABLES if t.source == source}
        for header, rows in parse(source).tables:
            values = " ".join(INLINE_CODE.sub(" ", c) for r in rows for c in r[1:])
            if FIGURE_LIKE.search(values) and not any(" | ".join(header).startswith(h) for h in registered):
                problems.append(f"{source}: a results table with no entry in tests/figures.py: {header}")
    for fid, value in MEASURED.items():
        figures[fid] = Reported(fid, value, repr(value), "tests/figures.py MEASURED", "a figure the demo prints",
                                MEASURED_GUARD)
    for source, claimed in spans.items():
        problems += [f"{source}: unregistered figure {u}" for u in unclaimed(source, claimed)]
    return figures, tuple(problems)


def reported(fig_id: str) -> Reported:
    figures, _ = index()
    if fig_id not in figures:
        raise KeyError(f"no figure {fig_id!r} in the documents (registered ids: tests/figures.py)")
    return figures[fig_id]


def check(fig_id: str, measured: float, bound: Bound, op: str = "=") -> None:
    """Assert ``measured`` against the figure the docs report. ``op``: ``=`` within the bound (and the rounding
    of the text), ``<=`` / ``>=`` the docs give a limit the measurement must keep, ``~`` the same order of
    magnitude (within a factor of 3)."""
    r = reported(fig_id)
    slack = bound.tol + r.half_unit
    if op == "~":  # only this one divides (a reported 0 is never an order of magnitude)
        ok = measured > 0 and r.value > 0 and abs(math.log10(measured / r.value)) <= math.log10(3)
    else:
        ok = {"=": abs(measured - r.value) <= slack, "<=": measured <= r.value + slack,
              ">=": measured >= r.value - slack}[op]
    log = os.environ.get("FIGURES_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"id": fig_id, "reported": r.text, "measured": measured, "op": op, "tol": bound.tol,
                                "why": bound.why, "test": os.environ.get("PYTEST_CURRENT_TEST", "")}) + "\n")
    assert ok, (f"{fig_id}: measured {measured:.6g}, {r.source} reports {r.text} ({r.where!r}); "
                f"allowed {op} within {bound.tol:.4g} + rounding {r.half_unit:g}: {bound.why}")


# ---- which test checks which id (read from the tests' source) -------------------------------------------
def checked_ids(node_id: str) -> list[re.Pattern[str]]:
    """The figure ids the test ``path::function`` passes to :func:`check`, as patterns (an f-string's
    fields match any one id component)."""
    path, func = node_id.split("::")
    if not (ROOT / path).is_file():
        return []
    tree = ast.parse((ROOT / path).read_text())
    fn = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == func), None)
    if fn is None:
        return []
    out = []
    for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
        name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
        if name != "check" or not call.args:
            continue
        arg = call.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            out.append(re.compile(re.escape(arg.value)))
        elif isinstance(arg, ast.JoinedStr):
            out.append(re.compile("".join(re.escape(v.value) if isinstance(v, ast.Constant) else r"[^.]+"
                                          for v in arg.values)))
    return out


def constants_in(node_id: str) -> set[object]:
    """Every constant in the source of the test ``path::function`` and of the module's functions it calls."""
    path, func = node_id.split("::")
    if not (ROOT / path).is_file():
        return set()
    tree = ast.parse((ROOT / path).read_text())
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    if func not in defs:
        return set()
    called = {n.func.id for n in ast.walk(defs[func]) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    nodes = [defs[func], *(defs[c] for c in called if c in defs and c != func)]
    return {n.value for fn in nodes for n in ast.walk(fn) if isinstance(n, ast.Constant)}


__all__ = ["Bound", "Reported", "auroc", "binomial", "bootstrap", "check", "checked_ids", "ci95", "exact", "index",
           "mean_of", "parse", "pgr", "reported", "spearman", "constants_in", "unclaimed"]
