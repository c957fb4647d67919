"""Contrast-Consistent Search (Burns et al. 2022, "Discovering Latent Knowledge in Language Models
Without Supervision"), batched over layers/heads and random restarts.

Unsupervised: on contrast pairs ``(x+, x-)`` (the same statement answered "yes" and "no") it
learns ``p(x) = sigmoid(w . norm(x) + b)`` minimising

    consistency (p(x+) - (1 - p(x-)))^2  +  confidence min(p(x+), p(x-))^2

averaged over pairs, plus ``weight_decay / 2 * |(w, b)|^2`` (as in elk). ``n_restarts`` random
spherical initialisations are optimised and the one with the lowest loss is kept.

Normalisation is fitted on the *training* pairs and stored (``mean_pos_``, ``scale_pos_``...);
prediction applies those statistics unchanged. elk re-normalised every evaluation batch with its
own statistics, which makes a pair's prediction depend on the rest of its batch (and on a
single example be meaningless); here one example scores the same alone or inside a batch.

Each (batch item, restart) is an independent problem with its own L-BFGS history and line search
(:func:`~intervene.probes.solvers.lbfgs.lbfgs_linear`), so fitting ``[L, N, D]`` gives exactly the
per-layer fits. The restarts share the features, so every pass over the data is one GEMM against
``[D, n_restarts]``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch

from intervene.probes.base import ArrayLike, Probe, check_pair
from intervene.probes.registry import register_probe
from intervene.probes.solvers.lbfgs import lbfgs_linear

__all__ = ["CCSProbe"]


@register_probe("ccs")
class CCSProbe(Probe):
    """CCS probe on contrast pairs (see the module docstring).

    Args:
        normalize: ``"burns"`` (per side: subtract the mean, divide by the average per-dimension
            std — Burns et al.'s normalisation), ``"meanonly"`` (only centre each side), ``"none"``.
        n_restarts: random initialisations; the lowest final loss wins (per batch item).
        max_iter: L-BFGS iterations at most. tol: stop when ``max|grad| <= tol`` or the
            objective changes by less than ``tol**2`` (relative).
        weight_decay: L2 penalty on ``(w, b)`` (elk's default 0.01).
        consistency_weight, confidence_weight: weights of the two loss terms.
        history: L-BFGS memory. seed: seeds the initialisations (shared by all batch items).

    Learned attributes:
        ``weight_`` [*batch, D] and ``bias_`` [*batch] (in normalised space), the normalisation
        statistics ``mean_pos_``/``mean_neg_`` [*batch, D] and ``scale_pos_``/``scale_neg_``
        [*batch], ``loss_`` [*batch] (best unregularised loss), ``platt_scale_``/``platt_bias_``
        [*batch] (identity until :meth:`calibrate`), ``direction_`` [*batch, D] (unit norm, in
        the original activation space), and ``coef_``/``intercept_``: the positive side's log-odds
        as an affine function of a raw activation, ``logit p(x+) = x+ @ coef_ + intercept_``.
    """

    n_inputs: ClassVar[int] = 2
    _tensor_attrs: ClassVar[dict[str, int]] = {
        "weight_": 1,
        "bias_": 0,
        "mean_pos_": 1,
        "mean_neg_": 1,
        "scale_pos_": 0,
        "scale_neg_": 0,
        "loss_": 0,
        "platt_scale_": 0,
        "platt_bias_": 0,
    }
    _meta_attrs: ClassVar[tuple[str, ...]] = ("n_iter_",)

    def __init__(
        self,
        normalize: Literal["burns", "meanonly", "none"] = "burns",
        n_restarts: int = 10,
        max_iter: int = 1000,
        tol: float = 1e-6,
        weight_decay: float = 0.01,
        consistency_weight: float = 1.0,
        confidence_weight: float = 1.0,
        history: int = 10,
        seed: int = 0,
    ) -> None:
        self.normalize = normalize
        self.n_restarts = n_restarts
        self.max_iter = max_iter
        self.tol = tol
        self.weight_decay = weight_decay
        self.consistency_weight = consistency_weight
        self.confidence_weight = confidence_weight
        self.history = history
        self.seed = seed

    # ---- fitting -----------------------------------------------------------------------------------
    def fit(self, x_pos: ArrayLike, x_neg: ArrayLike) -> CCSProbe:
        """Fit on contrast pairs ``x_pos``, ``x_neg`` [*batch, N, D] (no labels)."""
        xp, xn = check_pair(x_pos, x_neg)
        if self.normalize not in ("burns", "meanonly", "none"):
            raise ValueError(f"unknown normalize {self.normalize!r}; use 'burns', 'meanonly' or 'none'")
        self.mean_pos_, self.scale_pos_ = self._norm_stats(xp)
        self.mean_neg_, self.scale_neg_ = self._norm_stats(xn)
        zp, zn = self._normalized(xp, xn)
        batch, (n, d) = xp.shape[:-2], xp.shape[-2:]
        nb = max(1, batch.numel())
        gen = torch.Generator().manual_seed(self.seed)
        theta0 = torch.randn(self.n_restarts, d + 1, generator=gen, dtype=torch.float64)
        theta0 = (theta0 / theta0.norm(dim=-1, keepdim=True)).to(xp.device)  # Burns et al.'s spherical init
        res = lbfgs_linear(
            [zp.reshape(nb, n, d), zn.reshape(nb, n, d)],
            theta0.expand(nb, -1, -1),
            self._loss_grad,
            l2=self.weight_decay,
            penalize_bias=True,  # as elk: weight decay on (w, b)
            max_iter=self.max_iter,
            history=self.history,
            gtol=self.tol,
            ftol=self.tol**2,
        )
        theta, loss = res.theta, res.loss
        best = loss.argmin(-1)  # [B]
        rows = torch.arange(nb, device=xp.device)
        theta_best = theta[rows, best]
        self.weight_ = theta_best[:, :d].to(xp.dtype).reshape(*batch, d)
        self.bias_ = theta_best[:, d].to(xp.dtype).reshape(batch)
        self.loss_ = loss[rows, best].to(xp.dtype).reshape(batch)
        self.platt_scale_ = torch.ones(batch, dtype=xp.dtype, device=xp.device)
        self.platt_bias_ = torch.zeros(batch, dtype=xp.dtype, device=xp.device)
        self.n_iter_ = res.n_iter
        return self

    def _norm_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-side mean ``[*batch, D]`` and scalar scale ``[*batch]`` from the training data."""
        ones = torch.ones(x.shape[:-2], dtype=x.dtype, device=x.device)
        if self.normalize == "none":
            return torch.zeros(x.shape[:-2] + x.shape[-1:], dtype=x.dtype, device=x.device), ones
        mean = x.mean(-2)
        if self.normalize == "meanonly":
            return mean, ones
        centred = x - mean.unsqueeze(-2)
        std = centred.norm(dim=-2) / math.sqrt(x.shape[-2])  # per-dimension std, [*batch, D]
        return mean, std.mean(-1).clamp_min(torch.finfo(x.dtype).tiny)

    def _normalized(self, xp: torch.Tensor, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the stored training statistics (never statistics of the data being scored)."""

        def norm(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            mean, scale = mean.to(x.device, x.dtype), scale.to(x.device, x.dtype)
            return (x - mean.unsqueeze(-2)) / scale.unsqueeze(-1).unsqueeze(-1)

        return norm(xp, self.mean_pos_, self.scale_pos_), norm(xn, self.mean_neg_, self.scale_neg_)

    def _loss_grad(self, zs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """CCS loss [B, R] and its derivatives w.r.t. the margins ``zs = [z+, z-]`` [B, R, N]."""
        zp, zn = zs
        n = zp.shape[-1]
        pp, pn = torch.sigmoid(zp), torch.sigmoid(zn)
        c = pp + pn - 1
        m = torch.minimum(pp, pn)
        loss = (self.consistency_weight * c * c + self.confidence_weight * m * m).mean(-1)
        dp, dn = pp * (1 - pp), pn * (1 - pn)
        pos_min = pp <= pn
        conf = 2 * self.confidence_weight * m
        gzp = (2 * self.consistency_weight * c + torch.where(pos_min, conf, 0.0)) * dp / n
        gzn = (2 * self.consistency_weight * c + torch.where(pos_min, 0.0, conf)) * dn / n
        return loss, [gzp, gzn]

    # ---- prediction --------------------------------------------------------------------------------
    def credence(self, x_pos: ArrayLike, x_neg: ArrayLike) -> torch.Tensor:
        """Burns et al.'s credence ``0.5 * (p(x+) + 1 - p(x-))``, ``[*batch, N]`` (before Platt)."""
        self._check_fitted()
        xp, xn = check_pair(x_pos, x_neg)
        dtype = torch.promote_types(xp.dtype, self.weight_.dtype)
        zp, zn = self._normalized(xp.to(dtype), xn.to(dtype))
        w = self.weight_.to(zp.device, dtype).unsqueeze(-1)
        b = self.bias_.to(zp.device, dtype).unsqueeze(-1)
        pp = torch.sigmoid((zp @ w).squeeze(-1) + b)
        pn = torch.sigmoid((zn @ w).squeeze(-1) + b)
        return 0.5 * (pp + 1 - pn)

    def decision_function(self, *xs: ArrayLike) -> torch.Tensor:
        """Log-odds of the credence, Platt-scaled once calibrated; ``[*batch, N]``."""
        if len(xs) != 2:
            raise TypeError("CCSProbe takes a contrast pair: (x_pos, x_neg), each [..., N, D]")
        c = self.credence(*xs)
        eps = torch.finfo(c.dtype).eps
        logit = torch.logit(c.clamp(eps, 1 - eps))
        return self.platt_scale_.to(c.dtype).unsqueeze(-1) * logit + self.platt_bias_.to(c.dtype).unsqueeze(
            -1
        )

    def predict_proba(self, *xs: ArrayLike) -> torch.Tensor:
        """The credence ``0.5 * (p(x+) + 1 - p(x-))`` (Platt-scaled once calibrated), ``[*batch, N]``."""
        if len(xs) != 2:
            raise TypeError("CCSProbe takes a contrast pair: (x_pos, x_neg), each [..., N, D]")
        identity = (self.platt_scale_ == 1) & (self.platt_bias_ == 0)
        if bool(identity.all()):
            return self.credence(*xs)
        return torch.where(
            identity.unsqueeze(-1), self.credence(*xs), torch.sigmoid(self.decision_function(*xs))
        )

    def _apply_platt(self, scale: torch.Tensor, bias: torch.Tensor) -> None:
        dtype = self.weight_.dtype
        new_scale = scale.to(dtype) * self.platt_scale_
        new_bias = scale.to(dtype) * self.platt_bias_ + bias.to(dtype)
        flip = new_scale < 0
        # Negating (w, b) maps the credence c to 1 - c, i.e. negates its log-odds.
        self.weight_ = torch.where(flip.unsqueeze(-1), -self.weight_, self.weight_)
        self.bias_ = torch.where(flip, -self.bias_, self.bias_)
        self.platt_scale_ = new_scale.abs()
        self.platt_bias_ = new_bias

    # ---- views in the original activation space ----------------------------------------------------
    @property
    def direction_(self) -> torch.Tensor:
        """Unit vector ``[*batch, D]`` in the original space (the scalar normalisation keeps directions)."""
        self._check_fitted()
        return self.weight_ / self.weight_.norm(dim=-1, keepdim=True).clamp_min(
            torch.finfo(self.weight_.dtype).tiny
        )

    @property
    def coef_(self) -> torch.Tensor:
        """``[*batch, D]``: ``logit p(x+) = x+ @ coef_ + intercept_`` for a raw positive-side activation."""
        self._check_fitted()
        return self.weight_ / self.scale_pos_.unsqueeze(-1)

    @property
    def intercept_(self) -> torch.Tensor:
        """``[*batch]``: see :attr:`coef_`."""
        return self.bias_ - (self.coef_ * self.mean_pos_).sum(-1)
