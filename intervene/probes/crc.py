"""Contrast-Representation Clustering (CRC): unsupervised eigenvector probes on contrast pairs.

Two variants:

* ``method="vinc"`` — elk's VINC objective (``EigenReporter``/``EigenFitter``): the top eigenvector
  (largest algebraic eigenvalue) of

      A = var_weight * (Cov(x+) + Cov(x-)) / 2
          - neg_cov_weight * (Cov(x+, x-) + Cov(x-, x+)) / 2
          - (1 - neg_cov_weight) * (within-pair-variant covariance)

  Each side is centred on its own mean, so the pseudo-label (which side of the pair a statement
  is) contributes no variance. With one prompt variant per pair — what ``fit(x_pos, x_neg)``
  receives — the invariance term is zero, and elk's defaults (``var_weight=0``,
  ``neg_cov_weight=0.5``) look for the direction in which the two sides of a pair are most
  *anti*-correlated: a truth feature says yes on exactly one side. elk also erases the
  pseudo-label (which side a point is on) from ``A``, and so do we (``erase_pseudolabel``):

  - ``erasure="leace"`` (default, elk's): fit ``concept-erasure``'s ``LeaceFitter`` on both sides
    pooled, ``x = [x+; x-]`` ``[2N, D]``, with one-hot side indicators ``z`` ``[2N, 2]``; its
    projection ``P = I - L R`` (``L`` ``[D, r]``, ``R`` ``[r, D]``) is oblique. The objective becomes
    ``P A Pᵀ``, its top eigenvector ``w``, and the probe reads ``eraser(x)·w = (P x)·w``, so the
    readout on raw activations is ``coef_ = Pᵀ w`` (not unit). Every readout ``Pᵀ w`` is orthogonal
    to ``mean(x+) - mean(x-)`` either way; the oblique ``P`` changes which one wins, weighing each
    by ``|w|`` rather than ``|Pᵀ w|``. When the truth direction is nearly parallel to the
    pseudo-label direction, what an orthogonal projection leaves of it is weak next to noise in
    other directions, and the orthogonal variant falls to chance where this one does not
    (tests/test_crc_elk.py measures both against elk's ``EigenFitter``).
  - ``erasure="orth"``: the orthogonal projection ``I - u uᵀ`` of ``u = unit(mean(x+) - mean(x-))``
    (what this probe did before; kept for comparison).
* ``method="pca"`` — elk-generalization's CRC-TPC: the top principal component of the centred
  pair differences ``x+ - x-``.

The sign of the eigenvector is arbitrary (we fix it canonically: largest-magnitude coordinate
positive) until :meth:`~intervene.probes.base.Probe.calibrate` is called with labels.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from concept_erasure import LeaceFitter

from intervene.probes.base import ArrayLike, LinearProbe, check_pair
from intervene.probes.registry import register_probe

__all__ = ["CRCProbe"]


def _canonical_sign(v: torch.Tensor) -> torch.Tensor:
    """Flip each vector ``[..., D]`` so its largest-magnitude coordinate is positive (deterministic)."""
    idx = v.abs().argmax(-1, keepdim=True)
    sign = torch.sign(v.gather(-1, idx))
    return v * torch.where(sign == 0, torch.ones_like(sign), sign)


def _orth_eraser(mu_diff: torch.Tensor) -> torch.Tensor:
    """``I - u uᵀ`` for ``u = unit(mu_diff)``: ``mu_diff`` [*batch, D] -> [*batch, D, D] (float64)."""
    u = mu_diff.double()
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    eye = torch.eye(u.shape[-1], dtype=torch.float64, device=u.device)
    return eye - u.unsqueeze(-1) * u.unsqueeze(-2)


def _leace_eraser(xp: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
    """LEACE's projection ``P`` erasing the side of the pair, as elk's ``EigenFitter`` fits it.

    ``xp``, ``xn`` [*batch, N, D] -> ``P`` [*batch, D, D] (float64). ``LeaceFitter`` takes one
    problem at a time, so batch items are fitted in a loop; its defaults are elk's (shrinkage of
    the covariance, trace constraint, ``svd_tol=0.01``).
    """
    batch, (n, d) = xp.shape[:-2], xp.shape[-2:]
    x = torch.cat([xp, xn], dim=-2).double().reshape(-1, 2 * n, d)
    z = torch.zeros(2 * n, 2, dtype=torch.float64, device=xp.device)
    z[:n, 0], z[n:, 1] = 1.0, 1.0  # one indicator per side, as elk's update() builds them
    out = [LeaceFitter.fit(xi, z).eraser.P for xi in x]
    return torch.stack(out).reshape(*batch, d, d)


def _cov(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cross-covariance of centred ``a``, ``b`` [*batch, N, D] -> [*batch, D, D] (float64)."""
    n = a.shape[-2]
    return (a.transpose(-1, -2) @ b).double() / max(n - 1, 1)


@register_probe("crc")
class CRCProbe(LinearProbe):
    """Unsupervised CRC probe on contrast pairs (see the module docstring for the objectives).

    Args:
        method: ``"vinc"`` (elk's eigen objective) or ``"pca"`` (top PC of pair differences).
        var_weight: VINC weight of the within-side variance term (elk default 0).
        neg_cov_weight: VINC weight of the (negated) cross-side covariance, in [0, 1] (elk default 0.5).
        erase_pseudolabel: VINC only — erase the pseudo-label (which side) from the objective.
        erasure: how: ``"leace"`` (elk's oblique LEACE projection, default) or ``"orth"``
            (orthogonal projection of ``mean(x+) - mean(x-)``).

    Learned attributes:
        ``coef_`` [*batch, D] (the readout: the unit eigenvector, or ``Pᵀ w`` after LEACE erasure;
        times the Platt scale after ``calibrate``),
        ``intercept_`` [*batch] (centres the training scores; Platt bias after ``calibrate``),
        ``direction_`` (unit), ``eigenvalue_`` [*batch] (the objective value reached).

    The score of a pair is ``(x_pos - x_neg) @ coef_ + intercept_``.
    """

    n_inputs: ClassVar[int] = 2
    _tensor_attrs: ClassVar[dict[str, int]] = {"coef_": 1, "intercept_": 0, "eigenvalue_": 0}

    def __init__(
        self,
        method: Literal["vinc", "pca"] = "vinc",
        var_weight: float = 0.0,
        neg_cov_weight: float = 0.5,
        erase_pseudolabel: bool = True,
        erasure: Literal["leace", "orth"] = "leace",
    ) -> None:
        self.method = method
        self.var_weight = var_weight
        self.neg_cov_weight = neg_cov_weight
        self.erase_pseudolabel = erase_pseudolabel
        self.erasure = erasure

    def fit(self, x_pos: ArrayLike, x_neg: ArrayLike) -> CRCProbe:
        """Fit on contrast pairs ``x_pos``, ``x_neg`` [*batch, N, D] (no labels)."""
        xp, xn = check_pair(x_pos, x_neg)
        mu_p, mu_n = xp.mean(-2, keepdim=True), xn.mean(-2, keepdim=True)
        eraser = None  # P [*batch, D, D]: the readout on raw activations is Pᵀ w
        if self.method == "pca":
            diff = (xp - mu_p) - (xn - mu_n)
            objective = _cov(diff, diff)
        elif self.method == "vinc":
            if not 0.0 <= self.neg_cov_weight <= 1.0:
                raise ValueError("neg_cov_weight must be in [0, 1]")
            cp, cn = xp - mu_p, xn - mu_n
            var = (_cov(cp, cp) + _cov(cn, cn)) / 2
            xcov = _cov(cp, cn)
            objective = self.var_weight * var - self.neg_cov_weight * (xcov + xcov.transpose(-1, -2)) / 2
            if self.erase_pseudolabel:
                if self.erasure == "leace":
                    eraser = _leace_eraser(xp, xn)
                elif self.erasure == "orth":
                    eraser = _orth_eraser((mu_p - mu_n).squeeze(-2))
                else:
                    raise ValueError(f"unknown erasure {self.erasure!r}; use 'leace' or 'orth'")
                objective = eraser @ objective @ eraser.transpose(-1, -2)
        else:
            raise ValueError(f"unknown CRC method {self.method!r}; use 'vinc' or 'pca'")
        objective = (objective + objective.transpose(-1, -2)) / 2
        evals, evecs = torch.linalg.eigh(objective)
        top = evecs[..., :, -1]
        if eraser is not None and self.erasure == "leace":
            # the probe reads the erased activations: (P x)·w = x·(Pᵀ w)
            top = (eraser.transpose(-1, -2) @ top.unsqueeze(-1)).squeeze(-1)
        self.coef_ = _canonical_sign(top).to(xp.dtype)
        mean_diff = (mu_p - mu_n).squeeze(-2)
        self.intercept_ = -(self.coef_ * mean_diff).sum(-1)
        self.eigenvalue_ = evals[..., -1].to(xp.dtype)
        return self

    def _features(self, *xs: ArrayLike) -> torch.Tensor:
        if len(xs) != 2:
            raise TypeError("CRCProbe takes a contrast pair: (x_pos, x_neg), each [..., N, D]")
        xp, xn = check_pair(*xs)
        return xp - xn
