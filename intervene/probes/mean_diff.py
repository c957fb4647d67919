"""Difference-in-means ("mass-mean") probe: direction ``mean(pos) - mean(neg)``, threshold at the midpoint.

Mallen et al. (2023) found this simple probe among the best at generalising out of distribution,
and ITI uses the same direction ("mass mean shift").
"""

from __future__ import annotations

from typing import ClassVar

import torch

from intervene.probes.base import ArrayLike, LinearProbe, as_features, as_labels
from intervene.probes.registry import register_probe

__all__ = ["MeanDiffProbe", "class_means"]


def class_means(
    x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class means and counts. ``x`` [*batch, N, D], ``y`` [*batch, N] (0/1, x's dtype).

    Returns ``(mu0, mu1, n0, n1)`` with means ``[*batch, D]`` and counts ``[*batch]``.
    """
    n1 = y.sum(-1)
    n0 = y.shape[-1] - n1
    if bool((n1 == 0).any()) or bool((n0 == 0).any()):
        raise ValueError("both classes must be present in y (for every batch item)")
    mu1 = (y.unsqueeze(-2) @ x).squeeze(-2) / n1.unsqueeze(-1)
    mu0 = ((1 - y).unsqueeze(-2) @ x).squeeze(-2) / n0.unsqueeze(-1)
    return mu0, mu1, n0, n1


@register_probe("mean_diff")
class MeanDiffProbe(LinearProbe):
    """Direction ``mu1 - mu0``; the decision threshold sits at the midpoint of the class means.

    The log-odds are scaled as a one-dimensional Gaussian model along the direction (slope
    ``|mu1 - mu0| / sigma^2``, with ``sigma^2`` the pooled within-class variance of the
    projections), so ``predict_proba`` is roughly calibrated without Platt scaling. The direction
    and the midpoint threshold do not depend on that scale.

    Learned attributes: ``coef_`` [*batch, D], ``intercept_`` [*batch], ``direction_`` (unit),
    ``mean_pos_``/``mean_neg_`` [*batch, D] (class means).
    """

    _tensor_attrs: ClassVar[dict[str, int]] = {"coef_": 1, "intercept_": 0, "mean_pos_": 1, "mean_neg_": 1}

    def __init__(self, scale_by_variance: bool = True) -> None:
        self.scale_by_variance = scale_by_variance

    def fit(self, x: ArrayLike, y: ArrayLike) -> MeanDiffProbe:
        """Fit on ``x`` [*batch, N, D] with labels ``y`` [N] or [*batch, N]."""
        xt = as_features(x)
        yt = as_labels(y, xt)
        yt = yt.expand(*xt.shape[:-1])
        mu0, mu1, n0, n1 = class_means(xt, yt)
        diff = mu1 - mu0
        coef = diff
        if self.scale_by_variance:
            unit = diff / diff.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(diff.dtype).tiny)
            proj = (xt @ unit.unsqueeze(-1)).squeeze(-1)  # [*batch, N]
            centre = torch.where(
                yt.bool(), (mu1 * unit).sum(-1, keepdim=True), (mu0 * unit).sum(-1, keepdim=True)
            )
            var = ((proj - centre) ** 2).sum(-1) / max(yt.shape[-1] - 2, 1)
            coef = unit * (diff.norm(dim=-1) / var.clamp_min(torch.finfo(var.dtype).tiny)).unsqueeze(-1)
        self.coef_ = coef
        self.intercept_ = -(coef * (mu0 + mu1) / 2).sum(-1)
        self.mean_pos_ = mu1
        self.mean_neg_ = mu0
        return self
