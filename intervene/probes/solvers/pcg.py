"""Preconditioned nonlinear conjugate gradients for many small L2 logistic regressions (one per head).

ITI (Li et al., 2023) fits scikit-learn's ``LogisticRegression(C=1.0)`` on every head separately (1,024
heads for a 7B model), ranks heads by validation accuracy and keeps the top K. Here all heads are
fitted by one batched solver (:func:`fit_head_probes`) that minimises the same objective,

    F(w, b) = mean_i log(1 + exp(-s_i (x_i·w + b))) + λ/2 |w|²,   λ = 1 / (C N),  s_i = ±1,

(scikit-learn's objective divided by ``C N``: same minimiser; the intercept is not penalised), and
stops on scikit-learn's own criterion (largest gradient component of this mean-scaled objective
below ``tol``).

Why this solver (measured on 2 shared CPU cores, 4,000 rows x 128 dims per head): a pass over one
head's features costs ~0.03-0.1 ms (memory-bound), a full Gram matrix ``XᵀX`` ~2.3 ms, so Newton's
method (a weighted Gram per iteration, ~6 of them) is no faster than scikit-learn's L-BFGS loop
(~20-40 ms per head). We pay for one Gram of a row sample (``8·D`` rows) of the centred features
per head and use it, scaled by the logistic curvature bound 1/4 (Böhning's bound), as a fixed
preconditioner for nonlinear conjugate gradients with a Newton line search: ~5-8 iterations of two
passes each (``Xᵀr`` and ``X·d``, per-head ``mv``, so converged heads drop out). A few heads are
solved at a time so their features stay in cache, and chunks run on parallel threads.

Shapes: ``L`` layers, ``H`` heads, ``N`` examples, ``D`` head dim, ``B`` flattened heads.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

DEFAULT_CHUNK_BYTES = 8 * 2**20  # features of one chunk of heads (one copy); keep it cache-sized


@dataclass
class HeadProbes:
    """Per-head logistic-regression probes: ``coef`` ``[*heads, D]``, ``intercept`` ``[*heads]``."""

    coef: torch.Tensor
    intercept: torch.Tensor
    n_iter: torch.Tensor  # [*heads] CG iterations used
    converged: torch.Tensor  # [*heads] bool

    def decision_function(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[*heads, M]`` for features ``x`` ``[*heads, M, D]``."""
        w = self.coef.to(x.dtype)
        return torch.einsum("...md,...d->...m", x, w) + self.intercept.to(x.dtype).unsqueeze(-1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Accuracy ``[*heads]`` of ``logit > 0`` against labels ``y`` ``[M]`` (scikit-learn's ``predict``)."""
        pred = self.decision_function(x) > 0
        return (pred == y.bool()).double().mean(-1)


def fit_head_probes(x: torch.Tensor, y: torch.Tensor, C: float = 1.0, tol: float = 1e-4,
                    max_iter: int = 200, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                    precond_rows: int | None = None, seed: int = 0, n_jobs: int | None = None) -> HeadProbes:
    """Fit one L2 logistic regression per head, all heads in one batched solve.

    Args:
        x: features ``[*heads, N, D]`` (e.g. ``[L, H, N, D]``), any float dtype (solved in float32).
        y: labels ``[N]`` in {0, 1}, shared by every head.
        C: scikit-learn's inverse regularisation strength (honest_llama uses the default 1.0).
        tol: stop when every gradient component of the mean-scaled objective is below ``tol``
            (scikit-learn's L-BFGS stops on the same quantity with the same default, 1e-4).
        max_iter: conjugate-gradient iterations at most.
        chunk_bytes: bytes of features solved at once.
        precond_rows: rows sampled for the preconditioner's Gram matrix (default ``min(N, 8 D)``).
        seed: seeds that row sample (the result does not depend on it beyond ``tol``).
        n_jobs: chunks solved concurrently, each on one thread (default: torch's intra-op thread
            count). Chunks are small and memory-bound, so one thread per chunk scales better than
            splitting each operation; torch's thread count is 1 meanwhile (restored after).

    Returns:
        :class:`HeadProbes` with ``coef`` ``[*heads, D]`` and ``intercept`` ``[*heads]`` (float32).
    """
    if x.ndim < 2:
        raise ValueError(f"x must be [*heads, N, D], got {tuple(x.shape)}")
    heads, (n, d) = x.shape[:-2], x.shape[-2:]
    yf = torch.as_tensor(y).reshape(-1).to(torch.float32)
    if yf.shape[0] != n:
        raise ValueError(f"y has {yf.shape[0]} labels for {n} examples")
    xb = x.reshape(-1, n, d)
    nb = xb.shape[0]
    coef = torch.zeros(nb, d)
    icpt = torch.zeros(nb)
    iters = torch.zeros(nb, dtype=torch.int64)
    conv = torch.zeros(nb, dtype=torch.bool)
    rows = min(n, precond_rows or 8 * d)
    sub = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:rows].sort().values
    chunk = max(1, min(nb, chunk_bytes // max(1, n * d * 4)))
    slices = [slice(s, min(nb, s + chunk)) for s in range(0, nb, chunk)]

    def solve(sl: slice) -> None:
        res = _solve_chunk(xb[sl].to(torch.float32), yf, 1.0 / (C * n), tol, max_iter, sub)
        coef[sl], icpt[sl], iters[sl], conv[sl] = res

    threads = torch.get_num_threads()
    jobs = min(len(slices), n_jobs or threads)
    # One thread per chunk: each operation is too small to split, and idle OpenMP workers
    # spin-waiting between them cost more than they save on shared cores.
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
    if not bool(conv.all()):
        warnings.warn(f"{int((~conv).sum())} of {nb} head probes did not reach tol={tol} in {max_iter} "
                      "iterations", RuntimeWarning, stacklevel=2)
    return HeadProbes(coef.reshape(*heads, d), icpt.reshape(heads), iters.reshape(heads), conv.reshape(heads))


def _solve_chunk(x: torch.Tensor, y: torch.Tensor, lam: float, tol: float, max_iter: int,
                 sub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Preconditioned nonlinear CG (Polak-Ribière+) on ``c`` heads; ``x`` ``[c, N, D]`` float32.

    The parameters are ``θ = [w, b]`` ``[c, D+1]``. Features are centred implicitly, ``z = (X - mu) w + b``,
    which decouples the intercept from ``w`` in the preconditioner; the intercept is mapped back at
    the end. Per iteration each head's features are read twice (``Xᵀr`` and ``X·d``, per-head ``mv``
    so converged heads cost nothing); everything else is O(N + D²) per head.
    """
    c, n, d = x.shape
    x = x.contiguous()
    mu = x.mean(1)
    gram = _centred_gram(x, mu, sub) / (4.0 * sub.numel())
    chol = _spd_cholesky(gram, lam)  # preconditioner for w; the intercept's curvature is at most 1/4 too
    shift = torch.cat([-mu, torch.ones(c, 1)], 1)  # X_c·d_w + d_b = X·d_w + shift·d
    mu0 = torch.cat([-mu, torch.zeros(c, 1)], 1)
    pen = torch.full((d + 1,), lam)
    pen[d] = 0.0  # the intercept is not penalised
    inv_n = 1.0 / n
    ybar = float(y.mean().clamp(1e-6, 1 - 1e-6))
    theta = torch.zeros(c, d + 1)
    theta[:, d] = math.log(ybar / (1 - ybar))  # the optimal intercept for w = 0
    z = theta[:, d:].repeat(1, n)
    direction = torch.zeros(c, d + 1)
    g_prev, gs_prev = torch.zeros(c, d + 1), torch.ones(c)
    xr = torch.zeros(c, d + 1)
    q = torch.zeros(c, n)
    iters = torch.zeros(c, dtype=torch.int64)
    active = torch.ones(c, dtype=torch.bool)
    ids = list(range(c))
    for it in range(max_iter):
        p = torch.sigmoid(z)
        r = (p - y).mul_(inv_n)  # dF/dz, [c, N]
        for j in ids:
            torch.mv(x[j].T, r[j], out=xr[j, :d])
        sr = r.sum(-1, keepdim=True)
        xr[:, d:] = sr
        g = torch.addcmul(xr, mu0, sr).addcmul_(theta, pen)  # [Xᵀr - mu·Σr + λw, Σr]
        active &= g.abs().amax(-1) > tol
        ids = active.nonzero().flatten().tolist()
        if not ids:
            break
        iters += active
        s = torch.cat([torch.cholesky_solve(g[:, :d, None], chol).squeeze(-1), 4.0 * g[:, d:]], 1)
        gs = torch.linalg.vecdot(g, s)
        if it:  # Polak-Ribière+ in the preconditioned inner product
            beta = torch.linalg.vecdot(g - g_prev, s).div_(gs_prev).clamp_min_(0.0)
            direction = direction.mul_(beta.unsqueeze(-1)).sub_(s)
        else:
            direction = -s
        slope = torch.linalg.vecdot(g, direction)
        restart = slope >= 0  # not a descent direction: restart from the preconditioned gradient
        if bool(restart.any()):
            direction = torch.where(restart.unsqueeze(-1), -s, direction)
            slope = torch.where(restart, -gs, slope)
        for j in ids:
            torch.mv(x[j], direction[j, :d], out=q[j])
        q.add_(torch.linalg.vecdot(shift, direction).unsqueeze(-1))
        t = _line_search(z, p, q, y, slope, torch.linalg.vecdot(theta * pen, direction),
                         torch.linalg.vecdot(direction * pen, direction), inv_n)
        t = torch.where(active & torch.isfinite(t), t, 0.0)  # converged heads keep their θ exactly
        theta.addcmul_(t.unsqueeze(-1), direction)
        z.addcmul_(t.unsqueeze(-1), q)
        g_prev, gs_prev = g, gs.clamp_min(1e-30)
    w = theta[:, :d]
    return w, theta[:, d] - torch.linalg.vecdot(mu, w), iters, ~active


def _centred_gram(x: torch.Tensor, mu: torch.Tensor, rows: torch.Tensor, block: int = 512) -> torch.Tensor:
    """``Σ (x_i - mu)(x_i - mu)ᵀ`` over ``rows``: ``[c, D, D]`` float32, accumulated over row blocks so
    the centred copies stay cache-sized. (bfloat16 inputs would be ~4x faster on CPUs with native
    bfloat16, but the CPU kernels round the *output* to bfloat16, which breaks positive definiteness.)"""
    gram = torch.zeros(x.shape[0], x.shape[2], x.shape[2])
    full = rows.numel() == x.shape[1]
    for s in range(0, rows.numel(), block):
        xb = (x[:, s:s + block] if full else x.index_select(1, rows[s:s + block])) - mu.unsqueeze(1)
        gram.baddbmm_(xb.transpose(1, 2), xb)
    return gram


def _spd_cholesky(gram: torch.Tensor, lam: float) -> torch.Tensor:
    """Cholesky factor of ``gram + lam I`` in float32. Problems whose factorisation fails (a Gram matrix
    of nearly collinear features, rounded) are redone in float64 with a growing jitter: it is only a
    preconditioner, but it must stay positive definite."""
    eye = torch.eye(gram.shape[-1])
    a = gram + lam * eye
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
        chol[bad] = fixed.float()
    return chol


def _line_search(z: torch.Tensor, p0: torch.Tensor, q: torch.Tensor, y: torch.Tensor, slope: torch.Tensor,
                 lwd: torch.Tensor, ldd: torch.Tensor, inv_n: float) -> torch.Tensor:
    """Step ``t > 0`` near the minimiser of the convex ``φ(t) = F(θ + t·d)``, per head: two Newton steps.

    ``φ'(0) = slope < 0``; the margins move along ``q`` (``z + t·q``); ``lwd = λ w·d_w`` and
    ``ldd = λ d_w·d_w`` are the penalty's part of ``φ'`` and ``φ''``. The first step uses
    ``p0 = sigmoid(z)`` (already computed for the gradient). The second is kept inside the bracket
    the first one reveals — ``(0, t1)`` if it overshot (``φ'(t1) > 0``), else ``(t1, 4·t1)`` — and
    falls back to the bracket's midpoint. Conjugate gradients tolerate this inexact search.
    """
    q2 = q * q
    d2 = torch.linalg.vecdot(p0 * (1 - p0), q2).mul_(inv_n).add_(ldd)
    t1 = -slope / d2.clamp_min(1e-30)
    p = torch.sigmoid(torch.addcmul(z, t1.unsqueeze(-1), q))
    d1 = torch.linalg.vecdot(p - y, q).mul_(inv_n).add_(lwd).addcmul_(t1, ldd)
    d2 = torch.linalg.vecdot(p * (1 - p), q2).mul_(inv_n).add_(ldd)
    newton = t1 - d1 / d2.clamp_min(1e-30)
    over = d1 > 0
    lo = torch.where(over, torch.zeros_like(t1), t1)
    hi = torch.where(over, t1, 4 * t1)
    ok = (newton > lo) & (newton < hi)
    return torch.where(ok, newton, (lo + hi) / 2)
