"""Metrics for patching: functions of each row's next-token logits, and the result grid they fill.

A metric is ``metric(logits, pair) -> [rows]``: ``logits`` ``[rows, vocab]`` are each row's logits at its
last real token, ``pair`` ``[rows]`` says which clean/corrupted pair (``0..N-1``) the row belongs to, so
per-pair answers can be looked up. Use logit differences rather than probabilities where a linear
estimate matters (attribution patching).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _ids(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def logit_diff(answer: Sequence[int] | torch.Tensor, wrong: Sequence[int] | torch.Tensor) -> Metric:
    """``logit[answer] − logit[wrong]`` per pair (token ids ``[N]``)."""
    a, w = _ids(answer), _ids(wrong)

    def metric(logits: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        p = pair.to(logits.device)
        return logits[rows, a.to(logits.device)[p]].float() - logits[rows, w.to(logits.device)[p]].float()

    return metric


def answer_prob(answer: Sequence[int] | torch.Tensor) -> Metric:
    """``softmax(logits)[answer]`` per pair (causal tracing's score)."""
    a = _ids(answer)

    def metric(logits: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), -1)
        return probs[torch.arange(logits.shape[0], device=logits.device), a.to(logits.device)[pair.to(logits.device)]]

    return metric


@dataclass
class PatchingResult:
    """A grid of patching effects: rows are sites (or heads), columns positions.

    ``scores`` ``[rows, cols]`` is the normalised metric ``(M_patched − M_corrupted) / (M_clean − M_corrupted)``
    of the pair means: with ``direction="denoise"`` (clean activations into the corrupted run) 0 means no
    recovery and 1 full recovery; with ``"noise"`` (corrupted into clean) 1 means no damage and 0 full damage.
    ``raw`` ``[rows, cols]`` holds the mean metric itself and ``per_pair`` ``[rows, cols, N]`` each pair's.
    """

    scores: torch.Tensor
    raw: torch.Tensor
    per_pair: torch.Tensor
    clean: float
    corrupted: float
    rows: list[str]
    positions: list[int | str]
    tokens: list[str] | None = None
    direction: str = "denoise"
    method: str = "activation patching"
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.scores.shape[0]), int(self.scores.shape[1])

    def column_labels(self) -> list[str]:
        if self.tokens is not None:
            return [f"{p}: {t}" for p, t in zip(self.positions, self.tokens)]
        return [str(p) for p in self.positions]

    def to_csv(self, path: str | Path) -> Path:
        """One line per cell: row, position, token, score, raw metric."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["row", "position", "token", "score", "metric"])
            for i, r in enumerate(self.rows):
                for j, p in enumerate(self.positions):
                    tok = self.tokens[j] if self.tokens is not None else ""
                    w.writerow([r, p, tok, f"{float(self.scores[i, j]):.6g}", f"{float(self.raw[i, j]):.6g}"])
        return path

    def top(self, k: int = 5) -> list[tuple[str, int | str, float]]:
        """The ``k`` cells of largest score: ``(row, position, score)``."""
        flat = self.scores.reshape(-1)
        idx = torch.argsort(flat, descending=True)[:k].tolist()
        cols = self.shape[1]
        return [(self.rows[i // cols], self.positions[i % cols], float(flat[i])) for i in idx]

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """A heat map PNG (rows x positions, token labels)."""
        from intervene.methods.patching.plots import plot_grid

        return plot_grid(self.scores, self.rows, self.column_labels(), path,
                         title or f"{self.method} ({self.direction}): normalised metric",
                         colorbar="(M − M_corrupted) / (M_clean − M_corrupted)")
