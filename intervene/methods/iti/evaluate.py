"""Sweep ITI's strength α and number of heads K: truthfulness and side effects per setting.

Heads, directions and σ do not depend on K or α (the ranking is fixed by the probes), so one fit
with the largest K serves every setting: K picks a prefix of the ranked heads and α rescales the
shifts. Each setting is evaluated with :func:`intervene.evaluate.mc.truthfulness` and
:func:`intervene.evaluate.side_effects.side_effects`; a base row (``num_heads = 0``, ``alpha = 0``)
comes first.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from intervene.evaluate.mc import truthfulness
from intervene.evaluate.side_effects import side_effects
from intervene.intervenable import Intervenable
from intervene.methods.iti.intervention import ITI

DEFAULT_ALPHAS = (0.0, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0)


def evaluate_iti(model: Any, tok: Any, iti: ITI | None, eval_rows: Sequence[Mapping], ref_texts: Sequence[str],
                 batch_size: int = 16, **mc_kwargs: Any) -> dict[str, float]:
    """Truthfulness metrics on ``eval_rows`` and CE/KL on ``ref_texts`` (``iti=None``: the base model)."""
    if iti is None:
        row: dict[str, float] = dict(truthfulness(model, tok, eval_rows, batch_size=batch_size, **mc_kwargs))
        ivm = Intervenable(model, [], attach=False)
    else:
        ivm = Intervenable(model, [iti], attach=False)
        with ivm:
            row = dict(truthfulness(ivm, tok, eval_rows, batch_size=batch_size, **mc_kwargs))
    if ref_texts:
        row.update(side_effects(model, tok, ref_texts, ivm, batch_size=batch_size))
    return row


def sweep(model: Any, tok: Any, iti: ITI, eval_rows: Sequence[Mapping], ref_texts: Sequence[str],
          alphas: Sequence[float] = DEFAULT_ALPHAS, num_heads: Sequence[int] | None = None,
          batch_size: int = 16, progress: bool = False, **mc_kwargs: Any) -> list[dict[str, float]]:
    """Evaluate ``iti.top(k, alpha)`` for every K in ``num_heads`` (default: ``len(iti.heads)``) and α.

    Returns one dict per setting (plus the base row): ``num_heads``, ``alpha``, the truthfulness
    metrics (``mc1``/``mc2`` or ``accuracy``) and ``ce_base``, ``ce``, ``ce_delta``, ``kl``.
    ``progress`` shows a bar over the settings.
    """
    from tqdm.auto import tqdm

    ks = sorted({int(k) for k in (num_heads or [len(iti.heads)])})
    bar = tqdm(total=1 + len(ks) * sum(1 for a in alphas if a != 0.0), desc="ITI settings", disable=not progress)
    base = evaluate_iti(model, tok, None, eval_rows, ref_texts, batch_size, **mc_kwargs)
    bar.update(1)
    rows = [{"num_heads": 0, "alpha": 0.0, **base}]
    for k in ks:
        for a in alphas:
            if a == 0.0:  # identical to the base model; no need to run it again
                rows.append({**rows[0], "num_heads": k, "alpha": 0.0})
                continue
            res = evaluate_iti(model, tok, iti.top(k, alpha=float(a)), eval_rows, ref_texts, batch_size, **mc_kwargs)
            rows.append({"num_heads": k, "alpha": float(a), **res})
            bar.update(1)
    bar.close()
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write sweep rows as CSV (columns in first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    out = Path(path)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: (round(v, 6) if isinstance(v, float) else v) for c, v in r.items()})
    return out


def truth_key(rows: Sequence[Mapping[str, Any]]) -> str:
    """The headline truthfulness column of sweep rows: ``mc2`` if present, else ``accuracy`` / ``mc1``."""
    for k in ("mc2", "accuracy", "mc1"):
        if rows and k in rows[0]:
            return k
    raise ValueError("sweep rows hold no truthfulness metric")
