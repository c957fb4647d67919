"""Linear discriminant analysis probe with a shrinkage-regularised within-class covariance."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from intervene.probes.base import ArrayLike, LinearProbe, as_features, as_labels
from intervene.probes.mean_diff import class_means
from intervene.probes.registry import register_probe
from intervene.probes.solvers.newton import psd_solve

__all__ = ["LDAProbe", "ledoit_wolf_shrinkage"]


def ledoit_wolf_shrinkage(xc: torch.Tensor, emp_cov: torch.Tensor) -> torch.Tensor:
    """Ledoit–Wolf optimal shrinkage towards ``(tr S / D) * I``, batched (scikit-learn's formula).

    Args:
        xc: centred data ``[*batch, N, D]``; emp_cov: ``xc^T xc / N``, ``[*batch, D, D]``.

    Returns:
        The shrinkage coefficient in [0, 1], ``[*batch]``.
    """
    n, d = xc.shape[-2], xc.shape[-1]
    mu = emp_cov.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    delta_ = (emp_cov**2).sum((-2, -1))  # |S|_F^2
    # sum_jk (X^2)^T (X^2) = sum_i |x_i|^4: no D x D product needed.
    beta_ = (xc.pow(2).sum(-1) ** 2).sum(-1)
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - d * mu**2) / d
    beta = torch.minimum(beta, delta)
    return torch.where(
        delta > 0, beta / delta.clamp_min(torch.finfo(delta.dtype).tiny), torch.zeros_like(delta)
    )


@register_probe("lda")
class LDAProbe(LinearProbe):
    """Fisher LDA: ``coef = Sigma^-1 (mu1 - mu0)`` with a shrunk pooled within-class covariance.

    ``Sigma = (1 - a) S + a (tr S / D) I`` where ``S`` is the pooled within-class covariance and
    ``a`` the shrinkage (``"auto"``: Ledoit–Wolf, per batch item; a float in [0, 1]; or 0/None
    for none). The intercept is ``-coef . (mu0 + mu1) / 2 + log(n1 / n0)``, so the log-odds are
    those of the Gaussian model with shared covariance.

    Learned attributes: ``coef_`` [*batch, D], ``intercept_`` [*batch], ``direction_`` (unit),
    ``shrinkage_`` [*batch] (the coefficient used).
    """

    _tensor_attrs: ClassVar[dict[str, int]] = {"coef_": 1, "intercept_": 0, "shrinkage_": 0}

    def __init__(self, shrinkage: Literal["auto"] | float | None = "auto") -> None:
        self.shrinkage = shrinkage

    def fit(self, x: ArrayLike, y: ArrayLike) -> LDAProbe:
        """Fit on ``x`` [*batch, N, D] with labels ``y`` [N] or [*batch, N]."""
        xt = as_features(x)
        yt = as_labels(y, xt).expand(*xt.shape[:-1])
        mu0, mu1, n0, n1 = class_means(xt, yt)
        centre = torch.where(yt.bool().unsqueeze(-1), mu1.unsqueeze(-2), mu0.unsqueeze(-2))
        xc = xt - centre
        n, d = xt.shape[-2], xt.shape[-1]
        cov = (xc.transpose(-1, -2) @ xc).double() / n
        if self.shrinkage == "auto":
            alpha = ledoit_wolf_shrinkage(xc.double(), cov)
        elif self.shrinkage is None:
            alpha = torch.zeros(xt.shape[:-2], dtype=torch.float64, device=xt.device)
        else:
            alpha = torch.full(xt.shape[:-2], float(self.shrinkage), dtype=torch.float64, device=xt.device)
            if not 0.0 <= float(self.shrinkage) <= 1.0:
                raise ValueError("shrinkage must be 'auto', None, or a float in [0, 1]")
        target = cov.diagonal(dim1=-2, dim2=-1).mean(-1)  # tr(S) / D
        eye = torch.eye(d, dtype=torch.float64, device=xt.device)
        sigma = (1 - alpha).view(*alpha.shape, 1, 1) * cov + (alpha * target).view(*alpha.shape, 1, 1) * eye
        diff = (mu1 - mu0).double()
        flat = sigma.reshape(-1, d, d)
        coef = psd_solve(flat, diff.reshape(-1, d)).reshape(diff.shape)
        intercept = -(coef * (mu0 + mu1).double() / 2).sum(-1) + torch.log(n1.double() / n0.double())
        self.coef_ = coef.to(xt.dtype)
        self.intercept_ = intercept.to(xt.dtype)
        self.shrinkage_ = alpha.to(xt.dtype)
        return self
