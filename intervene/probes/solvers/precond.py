"""The preconditioner of :mod:`~intervene.probes.solvers.pcg`: Böhning's bound, diagonal or full.

For logistic regression the Hessian of the weight-normalised objective is bounded by
``Xcᵀ S Xc / 4 + l2 I`` (``S`` the sample weights, ``Xc`` the centred features; the logistic
curvature is at most 1/4). That bound, ``P = G/4 + l2 I`` with ``G`` the weighted covariance, is a
fixed preconditioner that makes conjugate gradients insensitive to the conditioning of the features —
but ``G`` costs ``rows·D²`` FLOPs, about as much as 25 CG iterations at ``D = 768`` (5,000 rows, 2 CPU
cores), and on well-conditioned features it saves none of them (measured: 19 iterations with it, 20
with its diagonal). So :class:`Preconditioner` starts from the diagonal of ``G`` (Jacobi, O(rows·D))
where the full matrix is expensive (``D > FULL_GRAM_MAX_DIM``) and :meth:`Preconditioner.upgrade`
computes the full one when the solver sees slow convergence.

Shapes: ``c`` feature matrices, ``R`` problems each, ``N`` rows, ``D`` features.
"""

from __future__ import annotations

import math

import torch

__all__ = ["FULL_GRAM_MAX_DIM", "Preconditioner"]

# Up to this width the full Gram matrix costs only a few CG iterations (measured at D = 128, 4,000 rows:
# ~4 iterations' worth, and it saves more), so it is computed from the start.
FULL_GRAM_MAX_DIM = 256


class Preconditioner:
    """``P = G/4 + l2 I`` on the weights (full or its diagonal) and ``1/4`` on the intercept.

    Args:
        x: features ``[c, N, D]`` (compute dtype).
        s: ``[c, N]`` the mean of the ``R`` problems' normalised sample weights (None: uniform). One ``G``
            serves every problem on a feature matrix: exactly Böhning's bound when ``R = 1``; for
            cross-validation folds it is close, and a preconditioner need not be exact.
        l2: ``[c, R]`` penalties. fit_intercept: centre the features (else ``mu = 0``, no intercept).
        rows: the rows ``G`` is estimated from ``[M]`` (sorted indices).
        full: start from the full ``G`` (else its diagonal, until :meth:`upgrade`).
    """

    def __init__(self, x: torch.Tensor, s: torch.Tensor | None, l2: torch.Tensor, fit_intercept: bool,
                 rows: torch.Tensor, full: bool) -> None:
        c, n, d = x.shape
        self.l2 = l2
        self.x_sub_owned = rows.numel() != n
        self.x_sub = x if not self.x_sub_owned else x.index_select(1, rows)
        self.s_sub = None if s is None else s[:, rows] / s[:, rows].sum(-1, keepdim=True).clamp_min(1e-300)
        # The centring point only reparametrises (z = (X - mu) w + b, exactly), so the sampled rows' mean
        # is as good as the full mean and saves a pass.
        if not fit_intercept:
            self.mu = torch.zeros(c, d, dtype=x.dtype)
        elif self.s_sub is None:
            self.mu = self.x_sub.mean(1)
        else:
            self.mu = torch.bmm(self.s_sub.to(x.dtype).unsqueeze(1), self.x_sub).squeeze(1)
        self.chol: torch.Tensor | None = None  # [c, R, D+1, D+1] float64 Cholesky factors of P (R = 1),
        # bordered by the intercept's 1/sqrt(curvature bound) (see solve_ext)
        self._b_curv = math.nan
        self.basis: tuple[torch.Tensor, torch.Tensor] | None = None  # eigenvectors, 1/eigenvalues of P (R > 1)
        self.inv_diag: torch.Tensor | None = None  # [c, R, D] 1/diag(P) (before the upgrade)
        if full:
            self._factor()
        else:
            xc = self.x_sub - self.mu.unsqueeze(1)
            var = (xc * xc).mean(1) if self.s_sub is None else torch.bmm(self.s_sub.to(x.dtype).unsqueeze(1),
                                                                         xc * xc).squeeze(1)
            self.inv_diag = 1.0 / (var.double().unsqueeze(1) / 4.0 + l2.unsqueeze(-1))  # [c, R, D]

    @property
    def full(self) -> bool:
        return self.chol is not None or self.basis is not None

    def upgrade(self) -> None:
        """Switch to the full ``G`` (no-op if already full). Costs ``rows·D²`` FLOPs and a factorisation.

        One problem per feature matrix: a Cholesky factor of ``P``. Several (cross-validation folds x
        ``C`` values, whose ``l2`` differ): one eigendecomposition of ``G`` serves all of them, where
        ``R`` Cholesky factors would cost ``R·D²`` memory and, from ``R`` ~ 16, more time.
        """
        if not self.full:
            self._factor()

    def _factor(self) -> None:
        # A gathered row sample is a private copy: centre it in place (no further copies).
        gram = _centred_gram(self.x_sub, self.mu, self.s_sub, in_place=self.x_sub_owned)
        if self.l2.shape[1] == 1:
            chol = _spd_cholesky(gram.double().unsqueeze(1) / 4.0, self.l2)
            c, r, d = chol.shape[0], chol.shape[1], chol.shape[-1]
            self.chol = chol.new_zeros(c, r, d + 1, d + 1)
            self.chol[..., :d, :d] = chol
        else:
            evals, evecs = torch.linalg.eigh(gram.double())  # float64: the small eigenvalues matter
            inv = 1.0 / (evals.clamp_min(0.0).unsqueeze(1) / 4.0 + self.l2.unsqueeze(-1))  # [c, R, D]
            self.basis = (evecs, inv)
        self.inv_diag = None
        self.x_sub = self.s_sub = None  # type: ignore[assignment]  # no longer needed

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        """``P⁻¹ g`` for the weights' gradient ``g`` ``[c, R, D]`` (float64)."""
        if self.inv_diag is not None:
            return g * self.inv_diag
        if self.basis is not None:
            evecs, inv = self.basis
            return ((g @ evecs) * inv) @ evecs.transpose(-1, -2)
        assert self.chol is not None
        d = g.shape[-1]
        return torch.cholesky_solve(g.to(self.chol.dtype).unsqueeze(-1),
                                    self.chol[..., :d, :d]).squeeze(-1).to(g.dtype)

    def solve_ext(self, g: torch.Tensor, b_curv: float) -> torch.Tensor:
        """``P⁻¹ g`` for the whole gradient ``g = [g_w, g_b]`` ``[c, R, D+1]`` (float64), the intercept's
        part scaled by ``b_curv`` (its curvature bound's inverse; 0: no intercept). The solver calls this
        every iteration, so the common (Cholesky) case is one triangular solve of a factor bordered by
        the intercept's ``1/sqrt(b_curv)``, not a split, a solve and a concatenation."""
        if self.chol is not None:
            d = self.chol.shape[-1] - 1
            if self._b_curv != b_curv:
                self._b_curv = b_curv
                self.chol[..., d, d] = 1.0 / math.sqrt(b_curv) if b_curv > 0 else 1.0
            low = torch.linalg.solve_triangular(self.chol, g.unsqueeze(-1), upper=False)  # cheaper than
            s = torch.linalg.solve_triangular(self.chol.mT, low, upper=True).squeeze(-1)  # cholesky_solve
            if b_curv <= 0:
                s[..., d] = 0.0
            return s
        d = g.shape[-1] - 1
        return torch.cat([self.solve(g[..., :d]), b_curv * g[..., d:]], -1)


def _centred_gram(x: torch.Tensor, mu: torch.Tensor, weights: torch.Tensor | None, block: int = 512,
                  in_place: bool = False) -> torch.Tensor:
    """``Σ_i s_i (x_i - mu)(x_i - mu)ᵀ`` over the rows of ``x`` ``[c, M, D]`` (``s_i`` = ``weights``
    ``[c, M]`` summing to one, or ``1/M``): ``[c, D, D]`` in ``x``'s dtype. ``in_place``: ``x`` is a
    scratch copy, centred (and weighted) in place and multiplied in one product; otherwise the rows are
    centred a block at a time, so the centred copies stay cache-sized. (bfloat16 inputs would be ~1.5x
    faster on CPUs with native bfloat16, but the CPU kernels round the *output* to bfloat16, which breaks
    positive definiteness.)"""
    c, m, d = x.shape
    if in_place:
        xb = x.sub_(mu.unsqueeze(1))
        if weights is not None:
            xb.mul_(weights.sqrt().to(x.dtype).unsqueeze(-1))
        gram = torch.bmm(xb.transpose(1, 2), xb)
        return gram if weights is not None else gram.div_(m)
    gram = torch.zeros(c, d, d, dtype=x.dtype)
    for s in range(0, m, block):
        xb = x[:, s:s + block] - mu.unsqueeze(1)
        if weights is not None:
            xb.mul_(weights[:, s:s + block].sqrt().to(x.dtype).unsqueeze(-1))
        gram.baddbmm_(xb.transpose(1, 2), xb)
    return gram if weights is not None else gram.div_(m)


def _spd_cholesky(gram: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Cholesky factors of ``gram + l2 I``: ``gram`` ``[c, 1, D, D]``, ``l2`` ``[c, R]`` -> ``[c, R, D, D]``,
    in ``gram``'s dtype. Factorisations that fail (a Gram matrix of nearly collinear features, rounded)
    are redone in float64 with a growing jitter: it is only a preconditioner, but it must stay positive
    definite."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
    a = gram + l2.to(gram.dtype)[..., None, None] * eye
    chol, info = torch.linalg.cholesky_ex(a)
    bad = info > 0
    if bool(bad.any()):
        a64 = a[bad].double()
        scale = a64.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30).view(-1, 1, 1)
        for eps in (1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
            fixed, info64 = torch.linalg.cholesky_ex(a64 + eps * scale * eye.double())
            if not bool((info64 > 0).any()):
                break
        chol = chol.clone()
        chol[bad] = fixed.to(chol.dtype)
    return chol
