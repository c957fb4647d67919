"""Preconditioned nonlinear conjugate gradients for many L2 logistic regressions.

Each problem minimises scikit-learn's L2 objective divided by ``C`` times the weight total,

    F(w, b) = sum_i s_i log(1 + exp(-y'_i (x_i·w + b))) + l2/2 |w|^2,   sum_i s_i = 1,  y'_i = ±1,

(same minimiser as ``LogisticRegression(C=C)`` with ``l2 = 1 / (C sum(sample_weight))``; the intercept is
not penalised).

Why this solver: on a CPU a pass over one problem's features (``X·v`` or ``Xᵀr``) is memory-bound and
cheap; a Gram matrix ``XᵀX`` costs ``N·D²`` FLOPs. Newton's method builds a weighted Gram every iteration;
first-order methods (L-BFGS) need hundreds of passes on badly conditioned features. Here Böhning's bound
on the Hessian, ``P = Xcᵀ S Xc / 4 + l2·I`` (centred features, from a row sample), is a fixed
preconditioner for nonlinear conjugate gradients (Polak-Ribière+) with a Newton line search: ~5-25
iterations of two passes each, insensitive to the conditioning of the features. Where the full ``P`` is
expensive (wide features) its diagonal is used until convergence is seen to be slow
(:mod:`~intervene.probes.solvers.precond`): on well-conditioned features the full matrix saves nothing.

Problems that share a feature matrix (cross-validation folds as 0/1 sample weights, several ``C``)
share its Gram matrix, and their passes become one small GEMM (``[R, N] @ [N, D]``) instead of ``R``
matrix-vector products. Feature matrices are solved a few at a time (``chunk_bytes``), so that they stay
in cache for all their iterations, and chunks run on parallel threads.

Shapes: ``B`` feature matrices, ``R`` problems per matrix, ``N`` examples, ``D`` features.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from intervene.probes.solvers.precond import FULL_GRAM_MAX_DIM, Preconditioner

# Features of one chunk (one copy). Each chunk's passes stream it from cache, so keep it small: on 2
# shared cores, 4 MiB was up to 1.5x faster than 8 or 16 MiB for 4000 x 128 heads.
DEFAULT_CHUNK_BYTES = 4 * 2**20

__all__ = ["DEFAULT_CHUNK_BYTES", "PCGFit", "fit_pcg", "run_chunks"]


@dataclass
class PCGFit:
    """Result of :func:`fit_pcg` for ``B x R`` problems (float64 parameters)."""

    coef: torch.Tensor  # [B, R, D]
    intercept: torch.Tensor  # [B, R]
    n_iter: torch.Tensor  # [B, R] int64, CG iterations used
    converged: torch.Tensor  # [B, R] bool


def fit_pcg(
    x: torch.Tensor,
    y: torch.Tensor,
    l2: torch.Tensor,
    *,
    sample_weight: torch.Tensor | None = None,
    fit_intercept: bool = True,
    gtol: float = 0.0,
    dtol: float = 0.0,
    max_iter: int = 200,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    precond_rows: int | None = None,
    full_gram: bool | None = None,
    seed: int = 0,
    n_jobs: int | None = None,
) -> PCGFit:
    """Fit ``R`` L2 logistic regressions on each of ``B`` feature matrices.

    Args:
        x: features ``[B, N, D]``; float64 features are solved in float64, others in float32.
        y: labels in {0, 1}, ``[N]`` (shared) or ``[B, N]``.
        l2: penalties ``[B, R]`` of the weight-normalised objective (see the module docstring).
        sample_weight: ``[B, R, N]`` non-negative weights (e.g. 0/1 cross-validation masks), or None
            (uniform). Normalised to sum to one per problem.
        fit_intercept: learn the (unpenalised) intercept, or fix it at 0.
        gtol: stop a problem when every gradient component of ``F`` is at most ``gtol`` (scikit-learn's
            L-BFGS criterion, on the same mean-scaled objective). dtol: stop when the preconditioned
            decrement ``gᵀP⁻¹g / 2`` is at most ``dtol`` (``P`` bounds the Hessian from above, so this
            is a lower estimate of the Newton decrement, i.e. of ``F - min F``). At least one must be
            positive; a problem stops on whichever is met first.
        max_iter: CG iterations at most.
        chunk_bytes: bytes of features solved at once.
        precond_rows: rows sampled for the preconditioner's Gram matrix (default ``min(N, max(8 D, 4096))``:
            its cost is ``rows·D²``, an iteration's ``4·N·D`` bytes read, so for ``D`` up to a few hundred
            all rows are worth it — measured, 4,000 x 128 heads to a tight ``dtol`` took 5 iterations with
            all rows, 10 with 1,024, and less time).
        full_gram: precondition with the full Gram matrix from the start (True), or with its diagonal
            until convergence is slow (False; see :mod:`~intervene.probes.solvers.precond`). Default:
            full for ``D <= FULL_GRAM_MAX_DIM``.
        seed: seeds that row sample (the optimum does not depend on it).
        n_jobs: chunks solved concurrently, each on one thread (default: torch's thread count). Chunks
            are small and memory-bound, so one thread per chunk scales better than splitting each
            operation. With a single chunk, its operations use torch's threads instead.

    Returns:
        :class:`PCGFit`: ``coef`` ``[B, R, D]``, ``intercept`` ``[B, R]`` (float64), iterations, converged.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be [B, N, D], got {tuple(x.shape)}")
    if gtol <= 0 and dtol <= 0:
        raise ValueError("set gtol or dtol (or both) to a positive tolerance")
    nb, n, d = x.shape
    l2 = torch.as_tensor(l2, dtype=torch.float64)
    r = l2.shape[-1]
    if l2.shape != (nb, r):
        raise ValueError(f"l2 must be [B, R] = [{nb}, R], got {tuple(l2.shape)}")
    yb = torch.as_tensor(y).to(torch.float64).expand(nb, n)
    if sample_weight is not None and sample_weight.shape != (nb, r, n):
        raise ValueError(f"sample_weight must be [B, R, N] = [{nb}, {r}, {n}], got {tuple(sample_weight.shape)}")
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    coef = torch.zeros(nb, r, d, dtype=torch.float64)
    icpt = torch.zeros(nb, r, dtype=torch.float64)
    iters = torch.zeros(nb, r, dtype=torch.int64)
    conv = torch.zeros(nb, r, dtype=torch.bool)
    rows = min(n, precond_rows or max(8 * d, 4096))
    sub = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:rows].sort().values
    chunk = max(1, min(nb, chunk_bytes // max(1, n * d * x.element_size())))
    slices = [slice(s, min(nb, s + chunk)) for s in range(0, nb, chunk)]

    def solve(sl: slice) -> None:
        sw = None if sample_weight is None else sample_weight[sl].double()
        res = _solve_chunk(x[sl].to(cdt).contiguous(), yb[sl], sw, l2[sl], fit_intercept, gtol, dtol,
                           max_iter, sub, full_gram)
        coef[sl], icpt[sl], iters[sl], conv[sl] = res

    run_chunks(solve, slices, n_jobs)
    return PCGFit(coef, icpt, iters, conv)


def run_chunks(solve: Callable[[slice], None], slices: list[slice], n_jobs: int | None = None) -> None:
    """Run ``solve`` on every slice: one chunk per thread, torch's intra-op threads set to 1 meanwhile.

    Each operation of a chunk is too small to split, and idle OpenMP workers spin-waiting between
    them cost more than they save on shared cores. A single chunk keeps torch's threads instead.
    """
    threads = torch.get_num_threads()
    jobs = min(len(slices), n_jobs or threads)
    if len(slices) == 1 and n_jobs is None:
        solve(slices[0])
        return
    torch.set_num_threads(1)
    try:
        if jobs <= 1:
            for sl in slices:
                solve(sl)
        else:
            with ThreadPoolExecutor(jobs) as pool:
                list(pool.map(solve, slices))
    finally:
        torch.set_num_threads(threads)


def _solve_chunk(
    x: torch.Tensor, y: torch.Tensor, sw: torch.Tensor | None, l2: torch.Tensor, fit_intercept: bool,
    gtol: float, dtol: float, max_iter: int, sub: torch.Tensor, full_gram: bool | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Preconditioned nonlinear CG on ``c`` feature matrices ``x`` ``[c, N, D]`` (compute dtype), ``R``
    problems each: labels ``y`` ``[c, N]``, weights ``sw`` ``[c, R, N]`` or None, ``l2`` ``[c, R]``.

    The parameters are ``θ = [w, b]`` ``[c, R, D+1]``. Features are centred implicitly,
    ``z = (X - mu) w + b``, which decouples the intercept from ``w`` in the preconditioner; the intercept
    is mapped back at the end. Per iteration each matrix is read twice (``Xᵀr`` and ``X·d``, per matrix,
    so matrices whose problems have all converged cost nothing); the rest is O(R (N + D²)) per matrix.
    Parameters, margins and residuals are float64; only the passes over ``X`` use its dtype.
    """
    c, n, d = x.shape
    r = l2.shape[1]
    cdt, f64 = x.dtype, torch.float64
    if sw is not None:
        sw = sw / sw.sum(-1, keepdim=True).clamp_min(1e-300)
    pen = torch.cat([l2.unsqueeze(-1).expand(c, r, d), torch.zeros(c, r, 1, dtype=f64)], -1)  # b is free
    b_curv = 4.0 if fit_intercept else 0.0  # the intercept's curvature is at most 1/4 (Σ s_i = 1)
    yr = y.unsqueeze(1)  # [c, 1, N]
    wts = sw if sw is not None else torch.full((c, 1, n), 1.0 / n, dtype=f64)
    neg_yw = -(yr * wts)  # dF/dz = p·s - y·s, one fused op per iteration

    theta = torch.zeros(c, r, d + 1, dtype=f64)  # [w, b]
    if fit_intercept:
        ybar = (wts * yr).sum(-1).expand(c, r).clamp(1e-6, 1 - 1e-6)
        theta[..., d] = torch.log(ybar / (1 - ybar))  # the optimal intercept for w = 0
    z = theta[..., d:].expand(c, r, n).clone()
    direction = torch.zeros(c, r, d + 1, dtype=f64)
    g_prev, gs_prev = torch.zeros(c, r, d + 1, dtype=f64), torch.ones(c, r, dtype=f64)
    xr = torch.zeros(c, r, d, dtype=cdt)
    q = torch.zeros(c, r, n, dtype=cdt)
    iters = torch.zeros(c, r, dtype=torch.int64)
    active = torch.ones(c, r, dtype=torch.bool)
    f_prev = torch.full((c, r), math.nan, dtype=f64)
    strikes = torch.zeros(c, r, dtype=torch.int64)
    stuck = torch.zeros(c, r, dtype=torch.bool)
    every = list(range(c))
    live = every
    xt = x.transpose(1, 2)
    # The first pass (the gradient at w = 0) comes before the preconditioner's row sample: it streams
    # the features from memory once, and the sample is then gathered from cache.
    p = torch.sigmoid(z)
    res = torch.addcmul(neg_yw, p, wts)
    torch.bmm(res.to(cdt), x, out=xr)
    pc = Preconditioner(x, None if sw is None else sw.mean(1), l2, fit_intercept, sub,
                        full=d <= FULL_GRAM_MAX_DIM if full_gram is None else full_gram)
    mu = pc.mu.to(f64).unsqueeze(1)  # [c, 1, D]
    one = torch.ones(c, 1, 1, dtype=f64)
    shift = torch.cat([-mu, one], -1)  # X_c·d_w + d_b = X·d_w + shift·d, [c, 1, D+1]
    mu0 = torch.cat([-mu, 0 * one], -1)  # Xᵀr - mu·Σr: the centred features' gradient
    start = 0  # the iteration the current preconditioner started at
    gs_start = torch.ones(c, r, dtype=f64)  # gᵀP⁻¹g there
    for it in range(max_iter + 1):
        if it > 0:
            p = torch.sigmoid(z)
            res = torch.addcmul(neg_yw, p, wts)  # dF/dz, [c, R, N]
            res_c = res.to(cdt)
            if live is every:  # one batched pass while every matrix is live
                torch.bmm(res_c, x, out=xr)
            else:
                for j in live:
                    torch.mm(res_c[j], x[j], out=xr[j])
        sr = res.sum(-1, keepdim=True)
        g = torch.cat([xr.to(f64), sr if fit_intercept else 0 * sr], -1).addcmul_(mu0, sr).addcmul_(pen, theta)
        s = pc.solve_ext(g, b_curv)
        gs = torch.linalg.vecdot(g, s)  # gᵀP⁻¹g
        restart_all = it == start
        if not pc.full and it - start >= 3 and bool((active & (gs > gs_start * 0.5 ** (it - start))).any()):
            # The diagonal preconditioner halves gᵀP⁻¹g less than once per iteration: the features are
            # badly conditioned, so the full Gram matrix pays for itself. Restart CG under it.
            pc.upgrade()
            s = pc.solve_ext(g, b_curv)
            gs = torch.linalg.vecdot(g, s)
            start, restart_all = it, True
            f_prev.fill_(math.nan)
        if it == start:
            gs_start = gs
        done = torch.linalg.vector_norm(g, math.inf, -1) <= gtol if gtol > 0 else torch.zeros_like(active)
        if dtol > 0:
            # Float32 passes put a noise floor under the gradient. Where P bounds the Hessian (the full
            # P does; its diagonal nearly, on the well-conditioned features it is kept for) a step along
            # -P⁻¹g gains at least gᵀP⁻¹g/2; when two steps in a row gain under a twentieth of that,
            # the gradient is noise: stop there if it is within 100x of the tolerance.
            # (The objective is computed only near the tolerance, or after 10 iterations under one
            # preconditioner, where a floor above an unreachable tolerance would show.)
            near = bool((gs <= 400 * dtol).any()) or it - start >= 10
            f = _objective(z, yr, wts, theta[..., :d], l2) if near else torch.full_like(gs, math.nan)
            strikes = torch.where(f_prev - f < 0.05 * gs_prev / 2, strikes + 1, 0)  # NaN: no strike
            done |= (gs <= 2 * dtol) | ((strikes >= 2) & (gs <= 200 * dtol))
            stuck |= active & ~done & (strikes >= 5)  # no progress possible above the tolerance
            f_prev = f
        active &= ~(done | stuck) if dtol > 0 else ~done
        if bool(active.all()):
            live = every
        else:
            live = active.any(-1).nonzero().flatten().tolist()
            if not live:
                break
        if it == max_iter:
            break
        iters += active
        if not restart_all:  # Polak-Ribière+ in the preconditioned inner product
            beta = (gs - torch.linalg.vecdot(g_prev, s)).div_(gs_prev).clamp_min_(0.0)
            direction = direction.mul_(beta.unsqueeze(-1)).sub_(s)
        else:
            direction = -s
        slope = torch.linalg.vecdot(g, direction)
        restart = slope >= 0  # not a descent direction: restart from the preconditioned gradient
        if bool(restart.any()):
            direction = torch.where(restart.unsqueeze(-1), -s, direction)
            slope = torch.where(restart, -gs, slope)
        dir_c = direction[..., :d].to(cdt)
        if live is every:
            torch.bmm(dir_c, xt, out=q)
        else:
            for j in live:
                torch.mm(dir_c[j], x[j].T, out=q[j])
        qd = q.to(f64).add_(torch.linalg.vecdot(shift, direction).unsqueeze(-1))  # X_c·d_w + d_b
        t = _line_search(z, p, qd, yr, wts, slope, torch.linalg.vecdot(theta * pen, direction),
                         torch.linalg.vecdot(direction * pen, direction))
        t = torch.where(active & torch.isfinite(t), t, 0.0)  # converged problems keep their θ exactly
        theta.addcmul_(t.unsqueeze(-1), direction)
        z.addcmul_(t.unsqueeze(-1), qd)
        g_prev, gs_prev = g, gs.clamp_min(1e-300)
    w = theta[..., :d]
    return w, theta[..., d] + torch.linalg.vecdot(mu0[..., :d], w), iters, ~active & ~stuck


def _objective(z: torch.Tensor, y: torch.Tensor, s: torch.Tensor, w: torch.Tensor, l2: torch.Tensor
               ) -> torch.Tensor:
    """``F`` ``[c, R]`` from margins ``z`` ``[c, R, N]``, labels ``y`` ``[c, 1, N]``, weights ``s``, ``w``."""
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y.expand_as(z), reduction="none")
    return torch.linalg.vecdot(loss, s.expand_as(z)) + 0.5 * l2 * torch.linalg.vecdot(w, w)


def _line_search(z: torch.Tensor, p0: torch.Tensor, q: torch.Tensor, y: torch.Tensor, s: torch.Tensor,
                 slope: torch.Tensor, lwd: torch.Tensor, ldd: torch.Tensor) -> torch.Tensor:
    """Step ``t > 0`` near the minimiser of the convex ``φ(t) = F(θ + t·d)``, per problem: two Newton steps.

    ``φ'(0) = slope < 0``; the margins move along ``q`` (``z + t·q``, ``[c, R, N]``) and the weights are
    ``s``; ``lwd = λ w·d_w`` and ``ldd = λ d_w·d_w`` are the penalty's part of ``φ'`` and ``φ''``. The first
    step uses ``p0 = sigmoid(z)`` (already computed for the gradient). The second is kept inside the
    bracket the first one reveals — ``(0, t1)`` if it overshot (``φ'(t1) > 0``), else ``(t1, 4·t1)`` —
    and falls back to the bracket's midpoint. Conjugate gradients tolerate this inexact search.
    """
    qs = q * s
    qqs = q * qs
    d2 = torch.linalg.vecdot(torch.addcmul(p0, p0, p0, value=-1), qqs).add_(ldd)
    t1 = -slope / d2  # d2 = 0 only for a zero direction: t = nan, dropped by the caller
    p = torch.sigmoid_(torch.addcmul(z, t1.unsqueeze(-1), q))
    d1 = torch.linalg.vecdot(p - y, qs).add_(lwd).addcmul_(t1, ldd)
    newton = t1 - d1 / torch.linalg.vecdot(p.addcmul_(p, p, value=-1), qqs).add_(ldd)
    over = d1 > 0
    lo = torch.where(over, 0.0, t1)
    hi = torch.where(over, t1, 4 * t1)
    ok = (newton > lo) & (newton < hi)
    return torch.where(ok, newton, (lo + hi) / 2)

