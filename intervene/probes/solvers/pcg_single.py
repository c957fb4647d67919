"""Preconditioned nonlinear CG for one L2 logistic regression per feature matrix, one matrix at a time.

The same method as :mod:`~intervene.probes.solvers.pcg` (Böhning's bound ``P = Xcᵀ Xc / 4N + l2 I`` as a
fixed preconditioner, Polak-Ribière+ directions, a two-step Newton line search, scikit-learn's stopping
rule), specialised for what ITI's head ranking asks: many feature matrices, one unweighted problem each,
a loose gradient tolerance. There the batched solver's cost is not arithmetic but per-operation
overhead: ~5 CG iterations of ~50 tensor operations on vectors of a few thousand entries, each
operation a few microseconds. Here:

- ``P`` comes from *all* rows, ``XᵀX`` by NumPy's symmetric rank-k path (``a.T @ a`` calls BLAS
  ``syrk``: half a general product's FLOPs, ~0.85 ms at 4,000 x 128 on one core). At ``w = 0`` and
  balanced labels it is the exact Hessian, so most problems stop after 1-3 iterations (2.2 on average
  on ``benchmarks/iti_probe_fit.py``'s features, against 5.2 with a 1,024-row sample).
- One problem at a time keeps its features in cache for all its passes, and every scalar is a Python
  float: an iteration is ~20 NumPy calls of ~1 µs plus two passes over the features (~35 µs each,
  ``gemv``).

Matrices are handed to ``n_jobs`` threads; NumPy's BLAS calls release the GIL.

Shapes: ``B`` feature matrices, ``N`` examples, ``D`` features.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.typing import NDArray

from intervene.probes.solvers.pcg import run_chunks

__all__ = ["fit_pcg_single"]

STALL = 10  # iterations without a new smallest gradient after which a problem stops, not converged


def fit_pcg_single(x: torch.Tensor, y: torch.Tensor, l2: float, *, gtol: float, max_iter: int = 200,
                   n_jobs: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit one L2 logistic regression (with an unpenalised intercept) on each feature matrix.

    Minimises ``F(w, b) = mean_i log(1 + exp(-y'_i (x_i·w + b))) + l2/2 |w|^2`` (scikit-learn's objective
    divided by ``C N``: ``l2 = 1 / (C N)``) until every gradient component is at most ``gtol``.

    Args:
        x: features ``[B, N, D]``; float64 is solved in float64, anything else in float32.
        y: labels ``[N]`` in {0, 1}, shared by every matrix.
        l2: the penalty of the mean-scaled objective.
        gtol: gradient tolerance (scikit-learn's L-BFGS criterion on the same objective).
        max_iter: CG iterations at most. A problem also stops (not converged) once its gradient has not
            reached a new minimum for ``STALL`` iterations: a ``gtol`` below the noise floor of float32
            passes (~1e-7 times the features' scale) cannot be reached.
        n_jobs: threads (default: torch's thread count); each solves whole matrices.

    Returns:
        ``coef`` ``[B, D]`` and ``intercept`` ``[B]`` (float64), iterations ``[B]`` (int64) and
        converged ``[B]`` (bool).
    """
    if x.ndim != 3:
        raise ValueError(f"x must be [B, N, D], got {tuple(x.shape)}")
    nb, n, d = x.shape
    dt = np.float64 if x.dtype == torch.float64 else np.float32
    yv = torch.as_tensor(y).reshape(-1).to(torch.float64).numpy()
    if yv.shape[0] != n:
        raise ValueError(f"y has {yv.shape[0]} labels for {n} examples")
    ybar = min(max(float(yv.mean()), 1e-6), 1 - 1e-6)
    coef = np.zeros((nb, d))
    icpt = np.zeros(nb)
    iters = np.zeros(nb, dtype=np.int64)
    conv = np.zeros(nb, dtype=bool)
    y_dt = yv.astype(dt)
    tdt = torch.float64 if dt is np.float64 else torch.float32

    def solve(sl: slice) -> None:
        for j in range(sl.start, sl.stop):
            xj = x[j].detach().to("cpu", tdt).contiguous().numpy()
            coef[j], icpt[j], iters[j], conv[j] = _solve_one(xj, y_dt, ybar, l2, gtol, max_iter)

    from threadpoolctl import threadpool_limits

    # One BLAS thread per matrix: the products are small, and idle BLAS threads spin on shared cores.
    with threadpool_limits(1, user_api="blas"):
        run_chunks(solve, [slice(j, j + 1) for j in range(nb)], n_jobs or torch.get_num_threads())
    return torch.from_numpy(coef), torch.from_numpy(icpt), torch.from_numpy(iters), torch.from_numpy(conv)


def _cholesky(a: NDArray[np.float64]) -> NDArray[np.float64]:
    """Lower Cholesky factor of the symmetric ``a`` ``[D, D]``; a factorisation that fails (nearly collinear
    features, rounded) is redone with a growing jitter: it is only a preconditioner, but it must be
    positive definite."""
    from scipy.linalg import lapack  # here, not at import: scipy.linalg costs ~0.14 s to import

    chol, info = lapack.dpotrf(a, lower=1, clean=1)
    scale = max(float(np.trace(a)) / a.shape[0], 1e-30)
    for eps in (1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1.0):
        if info == 0:
            break
        chol, info = lapack.dpotrf(a + eps * scale * np.eye(a.shape[0]), lower=1, clean=1)
    return chol


def _solve_one(x: NDArray[np.floating], y: NDArray[np.floating], ybar: float, l2: float, gtol: float,
               max_iter: int) -> tuple[NDArray[np.float64], float, int, bool]:
    """One problem: features ``x`` ``[N, D]`` (C-contiguous), labels ``y`` ``[N]`` (same dtype).

    Parametrised with centred features, ``z = (x - mu)·w + b``, so the intercept decouples from ``w`` in the
    preconditioner (its curvature bound is 1/4); mapped back at the end. The margins ``z`` live in the
    features' dtype (the passes are in it anyway); ``w``, the gradient and every scalar in float64.
    """
    from scipy.linalg import lapack

    n, d = x.shape
    inv_n = 1.0 / n
    u = np.full(n, inv_n, dtype=x.dtype)
    mu = (u @ x).astype(np.float64)  # [D]
    gram = (x.T @ x).astype(np.float64)  # BLAS syrk
    gram *= inv_n
    gram -= np.outer(mu, mu)
    gram *= 0.25
    gram.flat[:: d + 1] += l2
    chol = _cholesky(gram)

    b = math.log(ybar / (1 - ybar))  # the optimal intercept at w = 0
    w = np.zeros(d)
    z = np.full(n, b, dtype=x.dtype)
    p = np.full(n, ybar, dtype=x.dtype)
    res = np.empty_like(z)
    q = np.empty_like(z)
    tmp = np.empty_like(z)
    tmp2 = np.empty_like(z)
    z_t, p_t, tmp2_t = torch.from_numpy(z), torch.from_numpy(p), torch.from_numpy(tmp2)  # views, for sigmoid
    dw = np.zeros(d)
    db = 0.0
    gw_prev = np.zeros(d)
    gb_prev = gs_prev = 0.0
    best, best_it = math.inf, 0
    it = 0
    while True:
        if it > 0:
            torch.sigmoid(z_t, out=p_t)  # ~3x faster than scipy's expit at these sizes
        np.subtract(p, y, out=res)
        res *= inv_n
        sr = float(res.sum(dtype=np.float64))
        gw = (res @ x).astype(np.float64)
        gw -= sr * mu
        gw += l2 * w
        gb = sr
        gmax = max(float(np.abs(gw).max()), abs(gb))
        if gmax <= gtol:
            return w, b - float(mu @ w), it, True
        if gmax < best:
            best, best_it = gmax, it
        # No new smallest gradient in STALL iterations: it is at the noise floor of the dtype's passes,
        # above the tolerance (or NaN); running on to max_iter would not get below it.
        if it == max_iter or it - best_it >= STALL or math.isnan(gmax):
            return w, b - float(mu @ w), it, False
        sw = lapack.dpotrs(chol, gw, lower=1)[0]
        sb = 4.0 * gb
        gs = float(gw @ sw) + gb * sb
        if it == 0:
            beta = 0.0
        else:  # Polak-Ribière+ in the preconditioned inner product
            beta = max(0.0, (gs - float(gw_prev @ sw) - gb_prev * sb) / gs_prev)
        dw *= beta
        dw -= sw
        db = beta * db - sb
        slope = float(gw @ dw) + gb * db
        if slope >= 0:  # not a descent direction: restart from the preconditioned gradient
            np.negative(sw, out=dw)
            db, slope = -sb, -gs
        np.matmul(x, dw.astype(x.dtype), out=q)
        q += db - float(mu @ dw)
        lwd, ldd = l2 * float(w @ dw), l2 * float(dw @ dw)
        t = _line_search(z, p, q, y, slope, lwd, ldd, inv_n, tmp, tmp2, tmp2_t)
        if not math.isfinite(t):  # no step to take (see _line_search)
            return w, b - float(mu @ w), it, False
        w += t * dw
        b += t * db
        np.multiply(q, t, out=tmp)
        z += tmp
        gw_prev, gb_prev, gs_prev = gw, gb, max(gs, 1e-300)
        it += 1


def _line_search(z: NDArray[np.floating], p: NDArray[np.floating], q: NDArray[np.floating],
                 y: NDArray[np.floating], slope: float, lwd: float, ldd: float, inv_n: float,
                 tmp: NDArray[np.floating], tmp2: NDArray[np.floating], tmp2_t: torch.Tensor) -> float:
    """Step near the minimiser of the convex ``φ(t) = F(θ + t·d)``: two Newton steps, the second kept inside
    the bracket the first reveals (as :func:`~intervene.probes.solvers.pcg._line_search`). ``φ'(0) = slope``;
    the margins move along ``q``; ``lwd``, ``ldd`` are the penalty's parts of ``φ'`` and ``φ''``. ``p`` is
    ``sigmoid(z)`` and is overwritten; ``tmp``, ``tmp2`` are scratch (``tmp2_t`` a tensor view of ``tmp2``)."""
    np.multiply(q, q, out=tmp)
    tmp *= inv_n  # q² / N
    np.multiply(p, p, out=tmp2)
    np.subtract(p, tmp2, out=p)  # p (1 - p)
    d2 = float(p @ tmp) + ldd
    if not d2 > 0:  # no curvature along d (every margin saturated and d_w = 0) or NaN features
        return math.nan
    t1 = -slope / d2
    np.multiply(q, t1, out=tmp2)
    tmp2 += z
    torch.sigmoid(tmp2_t, out=tmp2_t)
    np.subtract(tmp2, y, out=p)
    d1 = float(p @ q) * inv_n + lwd + t1 * ldd
    np.multiply(tmp2, tmp2, out=p)
    np.subtract(tmp2, p, out=p)
    h1 = float(p @ tmp) + ldd
    newton = t1 - d1 / h1 if h1 > 0 else math.nan
    lo, hi = (0.0, t1) if d1 > 0 else (t1, 4 * t1)
    return newton if lo < newton < hi else (lo + hi) / 2
