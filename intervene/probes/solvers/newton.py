"""Batched solvers shared by the probes: L2-regularised logistic regression by damped Newton.

Why Newton and not L-BFGS/gradient descent: for many small problems (every layer, or every
attention head of every layer) a pass over the data is memory-bound, so the number of passes is
what costs. Newton converges in ~5-10 iterations; each builds the Hessian ``X^T diag(h) X`` with
one batched GEMM (compute-bound, efficient) and solves a ``(D+1)^2`` Cholesky system in float64.
The line search is almost free: the step's change in margins ``dz = X dw + db`` is one
matrix-vector pass, after which the objective along the step is O(N) per trial.

Problems are processed in chunks whose features fit in cache (``chunk_bytes``), each chunk to
convergence before the next, rather than all problems one iteration at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_BYTES = 16 * 2**20


@dataclass
class LogisticFit:
    """Result of :func:`fit_logistic` for ``B`` problems."""

    coef: torch.Tensor  # [B, D], float64
    intercept: torch.Tensor  # [B], float64
    n_iter: torch.Tensor  # [B], int64 Newton iterations used
    converged: torch.Tensor  # [B], bool


def _objective(
    z: torch.Tensor, y: torch.Tensor, sw: torch.Tensor, w: torch.Tensor, l2: torch.Tensor
) -> torch.Tensor:
    """Weighted mean log-loss of margins ``z`` [B, N] plus ``l2/2 * |w|^2``; float64 [B]."""
    loss = F.binary_cross_entropy_with_logits(z.double(), y.double(), reduction="none")
    return (loss * sw).sum(-1) + 0.5 * l2 * (w * w).sum(-1)


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    l2: torch.Tensor,
    *,
    sample_weight: torch.Tensor | None = None,
    x_index: torch.Tensor | None = None,
    y_index: torch.Tensor | None = None,
    fit_intercept: bool = True,
    max_iter: int = 100,
    tol: float = 1e-8,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> LogisticFit:
    """Minimise, for each of ``B`` problems, ``sum_i s_i log(1 + exp(-y'_i (x_i.w + b))) + l2/2 |w|^2``.

    The sample weights ``s`` are normalised to sum to one per problem, so ``l2 = 1 / (C * n)``
    reproduces scikit-learn's ``LogisticRegression(C=C)`` (whose objective is
    ``C * sum_i loss_i + |w|^2 / 2``; the intercept is not penalised).

    Args:
        x: features ``[Bx, N, D]``; problem ``j`` uses ``x[x_index[j]]`` (default ``x_index = arange``).
        y: labels in {0, 1}, ``[By, N]``, indexed by ``y_index`` the same way.
        l2: penalty per problem, ``[B]`` (already divided by the weight total, see above).
        sample_weight: ``[B, N]`` non-negative weights (e.g. 0/1 cross-validation masks), or None.
        fit_intercept: learn ``b`` (unpenalised) or fix it at 0.
        max_iter: Newton iterations at most. tol: stop when the Newton decrement
            ``g^T H^-1 g / 2`` (an estimate of the distance to the optimum of the objective,
            which is of order 0.1-1) falls below it.
        chunk_bytes: features per chunk of problems (the cache-sized working set).

    Returns:
        :class:`LogisticFit` with float64 ``coef`` [B, D] and ``intercept`` [B].
    """
    b_total = l2.shape[0]
    n, d = x.shape[-2], x.shape[-1]
    dev = x.device
    x_index = torch.arange(x.shape[0], device=dev) if x_index is None else x_index.to(dev)
    y_index = torch.arange(y.shape[0], device=dev) if y_index is None else y_index.to(dev)
    y = y.to(dev)
    l2 = l2.to(dev)
    sample_weight = None if sample_weight is None else sample_weight.to(dev)
    if x_index.shape[0] != b_total or y_index.shape[0] != b_total:
        raise ValueError("x_index, y_index and l2 must describe the same number of problems")
    coef = torch.zeros(b_total, d, dtype=torch.float64, device=dev)
    intercept = torch.zeros(b_total, dtype=torch.float64, device=dev)
    n_iter = torch.zeros(b_total, dtype=torch.int64, device=dev)
    converged = torch.zeros(b_total, dtype=torch.bool, device=dev)
    per_problem = max(1, n * d * x.element_size())
    chunk = max(1, min(b_total, chunk_bytes // per_problem))
    for start in range(0, b_total, chunk):
        sl = slice(start, min(b_total, start + chunk))
        xi, yi = x_index[sl], y_index[sl]
        # Problems sharing one feature matrix (CV folds, Cs) broadcast it instead of copying it.
        xc = x[xi[:1]] if bool((xi == xi[0]).all()) else x[xi]
        yc = y[yi].to(torch.float64)
        sw = (
            torch.ones(yc.shape, dtype=torch.float64, device=dev)
            if sample_weight is None
            else sample_weight[sl].double()
        )
        sw = sw / sw.sum(-1, keepdim=True).clamp_min(1e-300)
        res = _newton_chunk(xc, yc, sw, l2[sl].double(), fit_intercept, max_iter, tol)
        coef[sl], intercept[sl], n_iter[sl], converged[sl] = res
    return LogisticFit(coef, intercept, n_iter, converged)


def _newton_chunk(
    x: torch.Tensor,
    y: torch.Tensor,
    sw: torch.Tensor,
    l2: torch.Tensor,
    fit_intercept: bool,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Damped Newton on one chunk. ``x`` [Bc or 1, N, D] (compute dtype); the rest float64.

    (Re-using a Hessian across iterations was tried: it trades each saved GEMM for ~2 extra
    iterations here, because the first Hessian, at ``w = 0``, is far from the later ones.)
    """
    bc, d = y.shape[0], x.shape[-1]
    cdt, dev = x.dtype, x.device
    w = torch.zeros(bc, d, dtype=torch.float64, device=dev)
    b = torch.zeros(bc, dtype=torch.float64, device=dev)
    z = torch.zeros(bc, y.shape[-1], dtype=torch.float64, device=dev)
    f = _objective(z, y, sw, w, l2)
    active = torch.ones(bc, dtype=torch.bool, device=dev)
    iters = torch.zeros(bc, dtype=torch.int64, device=dev)
    eye = torch.eye(d, dtype=torch.float64, device=dev)
    shared = x.shape[0] == 1
    for _ in range(max_iter):
        ids = active.nonzero().squeeze(-1)
        if ids.numel() == 0:
            break
        xa = x if shared else x[ids]
        wa, ba, za, ya, swa, l2a = w[ids], b[ids], z[ids], y[ids], sw[ids], l2[ids]
        p = torch.sigmoid(za)
        r = swa * (p - ya)  # dLoss/dz, [A, N]
        h = (swa * p * (1 - p)).to(cdt)  # d2Loss/dz2
        # Gradient and Hessian GEMMs in the compute dtype (float32), assembled in float64.
        gw = (r.to(cdt).unsqueeze(-2) @ xa).squeeze(-2).double() + l2a.unsqueeze(-1) * wa
        xh = xa * h.unsqueeze(-1)
        hess = (xh.transpose(-1, -2) @ xa).double() + l2a.view(-1, 1, 1) * eye
        if fit_intercept:
            hwb = xh.sum(-2).double()  # [A, D]
            hbb = h.double().sum(-1, keepdim=True)
            hess = torch.cat(
                [torch.cat([hess, hwb.unsqueeze(-1)], -1), torch.cat([hwb, hbb], -1).unsqueeze(-2)], dim=-2
            )
            grad = torch.cat([gw, r.sum(-1, keepdim=True)], -1)
        else:
            grad = gw
        del xh
        step = -psd_solve(hess, grad)
        dec = -(grad * step).sum(-1)  # Newton decrement squared, >= 0
        dw = step[:, :d]
        db = step[:, d] if fit_intercept else torch.zeros_like(ba)
        dz = (xa @ dw.to(cdt).unsqueeze(-1)).squeeze(-1).double() + db.unsqueeze(-1)
        t, f_new = _backtrack(za, dz, ya, swa, wa, dw, l2a, f[ids], dec)
        moved = t > 0
        w[ids] = wa + t.unsqueeze(-1) * dw
        b[ids] = ba + t * db
        z[ids] = za + t.unsqueeze(-1) * dz
        f[ids] = torch.where(moved, f_new, f[ids])
        iters[ids] += 1
        # Converged when the predicted decrease is negligible, or no step can decrease f further.
        # A backtracked step this close to the optimum means float32 noise in the gradient and
        # margins dominates the Newton step (badly scaled features): that is the attainable floor.
        noise_floor = (t < 1) & (dec / 2 <= 1e3 * tol)
        done = (dec / 2 <= tol) | ~moved | noise_floor
        active[ids] = ~done
    return w, b, iters, ~active


def psd_cholesky(a: torch.Tensor) -> torch.Tensor:
    """Cholesky factors of symmetric positive (semi)definite ``a`` [B, K, K], with jitter if needed."""
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info > 0).any()):
        # Unregularised intercept-only directions can be singular (e.g. all weights zero): add a
        # relative jitter to the failed problems only.
        bad = info > 0
        scale = a[bad].diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-12)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        for eps in (1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
            chol_bad, info_bad = torch.linalg.cholesky_ex(a[bad] + (eps * scale).view(-1, 1, 1) * eye)
            if not bool((info_bad > 0).any()):
                break
        chol = chol.clone()
        chol[bad] = chol_bad
    return chol


def psd_solve(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Solve ``a x = g`` for symmetric positive (semi)definite ``a`` [B, K, K] (``g``: [B, K])."""
    return torch.cholesky_solve(g.unsqueeze(-1), psd_cholesky(a)).squeeze(-1)


def _backtrack(
    z: torch.Tensor,
    dz: torch.Tensor,
    y: torch.Tensor,
    sw: torch.Tensor,
    w: torch.Tensor,
    dw: torch.Tensor,
    l2: torch.Tensor,
    f0: torch.Tensor,
    dec: torch.Tensor,
    max_halvings: int = 30,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Armijo backtracking per problem; each trial is O(N) since the margins move along ``dz``.

    Returns the step sizes ``t`` [A] (0 where no decrease was found) and the objective there.
    """
    t = torch.ones_like(f0)
    f_at = torch.full_like(f0, math.inf)
    pending = torch.ones_like(f0, dtype=torch.bool)
    for _ in range(max_halvings):
        ids = pending.nonzero().squeeze(-1)
        if ids.numel() == 0:
            break
        ti = t[ids]
        fi = _objective(
            z[ids] + ti.unsqueeze(-1) * dz[ids], y[ids], sw[ids], w[ids] + ti.unsqueeze(-1) * dw[ids], l2[ids]
        )
        ok = fi <= f0[ids] - 1e-4 * ti * dec[ids]
        f_at[ids] = torch.where(ok, fi, f_at[ids])
        pending[ids] = ~ok
        t[ids] = torch.where(ok, ti, ti / 2)
    t = torch.where(pending, torch.zeros_like(t), t)
    return t, f_at


def fit_logistic_1d(
    scores: torch.Tensor, y: torch.Tensor, l2: float = 1e-6, max_iter: int = 50
) -> LogisticFit:
    """Platt scaling: ``sigmoid(a * s + b)`` fitted to labels, for ``B`` score vectors ``[B, N]``."""
    x = scores.double().unsqueeze(-1)  # [B, N, 1]
    yb = y.double().expand(scores.shape)
    l2s = torch.full((scores.shape[0],), l2, dtype=torch.float64, device=scores.device)
    return fit_logistic(x, yb, l2s, max_iter=max_iter)
