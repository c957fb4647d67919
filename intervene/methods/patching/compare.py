"""How well an estimate (attribution patching) ranks cells like the real thing (a patching sweep)."""

from __future__ import annotations

from typing import Any

import torch

from intervene.errors import InterventionError
from intervene.methods.patching.metrics import PatchingResult


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions), float64."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(x.numel(), dtype=torch.float64)
    for v in torch.unique(x):
        tied = x == v
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally shaped tensors (flattened)."""
    ra, rb = _ranks(a.reshape(-1).double()), _ranks(b.reshape(-1).double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def agreement(estimate: PatchingResult, real: PatchingResult, k: int = 3) -> dict[str, Any]:
    """Spearman over all cells and over the live ones (|score| > 1e-6 in either grid), and per row (site) the
    overlap of the ``k`` live positions of largest |score|."""
    if estimate.rows != real.rows or estimate.positions != real.positions:
        raise InterventionError("the two grids have different rows or positions")
    # cells where clean and corrupted agree are 0 in both grids; they tie and would inflate a rank correlation
    live = (estimate.scores.abs() > 1e-6) | (real.scores.abs() > 1e-6)
    per_row = {}
    for i, row in enumerate(real.rows):
        cols = live[i].nonzero().flatten()
        kk = min(k, int(cols.numel()))
        if kk == 0:
            continue  # nothing to rank in this row
        top_e = set(cols[torch.argsort(estimate.scores[i, cols].abs(), descending=True)[:kk]].tolist())
        top_r = set(cols[torch.argsort(real.scores[i, cols].abs(), descending=True)[:kk]].tolist())
        per_row[row] = len(top_e & top_r) / kk
    n_top = max(1, min(10, real.scores.numel()))
    top_e = set(torch.argsort(estimate.scores.reshape(-1).abs(), descending=True)[:n_top].tolist())
    top_r = set(torch.argsort(real.scores.reshape(-1).abs(), descending=True)[:n_top].tolist())
    return {"spearman": spearman(estimate.scores, real.scores), "cells": int(real.scores.numel()),
            "spearman_live": spearman(estimate.scores[live], real.scores[live]) if int(live.sum()) > 1 else float("nan"),
            "live_cells": int(live.sum()),
            f"top{k}_overlap_per_row": per_row,
            "mean_top_overlap": sum(per_row.values()) / len(per_row) if per_row else float("nan"), f"global_top{n_top}_overlap": len(top_e & top_r) / n_top}
