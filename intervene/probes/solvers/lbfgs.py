"""Batched L-BFGS for linear-margin models, one independent optimisation per problem.

A "linear-margin" objective depends on its parameters ``theta = (w, b)`` only through margins
``z = x @ w + b`` (one set per feature tensor: CCS has two, ``x+`` and ``x-``; logistic
regression one). That gives two savings over a generic optimiser:

* all ``R`` problems that share a feature matrix (CCS restarts, cross-validation folds x Cs) are
  evaluated with one GEMM ``[R, D] @ [D, N]`` instead of ``R`` matrix-vector products (margins
  are kept ``[B, R, N]`` so both GEMMs read the features in their stored layout);
* along a search direction the margins move linearly (``z + t * dz``), so after one GEMM for
  ``dz`` every line-search trial costs O(N).

Unlike ``torch.optim.LBFGS`` on a summed loss, every problem keeps its own curvature history,
step size and stopping decision, so fitting a batch gives exactly the per-problem results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

LossGrad = Callable[[list[torch.Tensor]], tuple[torch.Tensor, list[torch.Tensor]]]

__all__ = ["LBFGSResult", "lbfgs_linear"]


@dataclass
class LBFGSResult:
    theta: torch.Tensor  # [B, R, D+1] float64; the last entry is the bias
    loss: torch.Tensor  # [B, R] float64, the loss without the penalty
    n_iter: int  # iterations run (the slowest problem's)
    converged: torch.Tensor  # [B, R] bool


def lbfgs_linear(
    xs: Sequence[torch.Tensor],
    theta0: torch.Tensor,
    loss_grad: LossGrad,
    *,
    l2: torch.Tensor | float = 0.0,
    penalize_bias: bool = False,
    fit_bias: bool = True,
    max_iter: int = 1000,
    history: int = 10,
    gtol: float = 0.0,
    ftol: float = 0.0,
    dtol: float = 0.0,
) -> LBFGSResult:
    """Minimise ``loss(z) + l2/2 * (|w|^2 [+ b^2])`` with ``z_j = xs[j] @ w + b`` for ``B x R`` problems.

    Args:
        xs: feature tensors ``[B, N, D]`` (compute dtype, e.g. float32), shared by the ``R``
            problems of each batch item.
        theta0: initial parameters ``[B, R, D+1]``.
        loss_grad: ``zs -> (loss [B, R], [dloss/dz_j [B, R, N]])`` on float64 margins ``[B, R, N]``.
        l2: penalty weight, a float or ``[B, R]``. penalize_bias: include ``b`` in the penalty.
        fit_bias: if False the bias stays at ``theta0``'s value.
        max_iter: iterations at most. history: L-BFGS memory.
        gtol: stop a problem when ``max|grad| <= gtol``. ftol: when the objective changes by at most
            ``ftol * max(|f|, 1)``. dtol: when the quasi-Newton decrement ``-grad . step / 2`` (an
            estimate of the distance to the optimum) is at most ``dtol``. A failed line search
            also stops a problem.
    """
    cdt = xs[0].dtype
    d = xs[0].shape[-1]
    dev = theta0.device
    theta = theta0.to(torch.float64).clone()
    l2_t = torch.as_tensor(l2, dtype=torch.float64, device=dev).expand(theta.shape[:-1])
    pen_mask = torch.ones(d + 1, dtype=torch.float64, device=dev)
    pen_mask[d] = float(penalize_bias)
    grad_mask = torch.ones(d + 1, dtype=torch.float64, device=dev)
    grad_mask[d] = float(fit_bias)

    xts = [x.transpose(-1, -2) for x in xs]  # [B, D, N] views

    def margins(th: torch.Tensor) -> list[torch.Tensor]:
        w = th[..., :d].to(cdt)  # [B, R, D]
        b = th[..., d].unsqueeze(-1)  # [B, R, 1]
        return [(w @ xt).double() + b for xt in xts]

    def penalty(th: torch.Tensor) -> torch.Tensor:
        return 0.5 * l2_t * (th * th * pen_mask).sum(-1)

    def gradient(dzs: list[torch.Tensor], th: torch.Tensor) -> torch.Tensor:
        gw = sum((dz.to(cdt) @ x).double() for x, dz in zip(xs, dzs))  # [B, R, D]
        gb = sum(dz.sum(-1) for dz in dzs)  # [B, R]
        g = torch.cat([gw, gb.unsqueeze(-1)], -1)  # type: ignore[list-item]
        return (g + l2_t.unsqueeze(-1) * pen_mask * th) * grad_mask

    zs = margins(theta)
    loss, dzs = loss_grad(zs)
    f = loss + penalty(theta)
    g = gradient(dzs, theta)
    m = max(1, history)
    s_hist = torch.zeros(m, *theta.shape, dtype=torch.float64, device=dev)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros(m, *theta.shape[:-1], dtype=torch.float64, device=dev)
    gamma = torch.zeros(theta.shape[:-1], dtype=torch.float64, device=dev)  # 0: no curvature pair yet
    active = g.abs().amax(-1) > gtol
    converged = ~active
    k = 0
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - `it` is reported
        if not bool(active.any()):
            it -= 1
            break
        # Two-loop recursion for all problems at once (a skipped pair has rho = 0: no effect).
        order = [(k - 1 - i) % m for i in range(min(k, m))]
        q = g.clone()
        alphas = []
        for slot in order:
            a = rho[slot] * (s_hist[slot] * q).sum(-1)
            q -= a.unsqueeze(-1) * y_hist[slot]
            alphas.append(a)
        first = gamma == 0
        gnorm1 = g.abs().sum(-1).clamp_min(1e-300)
        r = q * torch.where(first, torch.clamp(1.0 / gnorm1, max=1.0), gamma).unsqueeze(-1)
        for slot, a in zip(reversed(order), reversed(alphas)):
            beta = rho[slot] * (y_hist[slot] * r).sum(-1)
            r += s_hist[slot] * (a - beta).unsqueeze(-1)
        step = -r
        gd = (g * step).sum(-1)
        not_descent = gd >= 0
        step = torch.where(not_descent.unsqueeze(-1), -g / gnorm1.unsqueeze(-1), step)
        gd = torch.where(not_descent, -(g * g).sum(-1) / gnorm1, gd)
        if dtol > 0:
            close = active & ~first & ~not_descent & (-gd / 2 <= dtol)
            converged |= close
            active &= ~close
        step = step * active.unsqueeze(-1)
        dzs_step = margins(step)
        t, f_new = _armijo(loss_grad, penalty, zs, dzs_step, theta, step, f, gd, active)
        moved = t > 0
        s = t.unsqueeze(-1) * step
        theta = theta + s
        zs = [z + t.unsqueeze(-1) * dz for z, dz in zip(zs, dzs_step)]
        loss_new, dzs = loss_grad(zs)
        g_new = gradient(dzs, theta)
        yv = g_new - g
        sy = (s * yv).sum(-1)
        valid = moved & (sy > 1e-12)
        slot = k % m
        s_hist[slot] = torch.where(valid.unsqueeze(-1), s, 0.0)
        y_hist[slot] = torch.where(valid.unsqueeze(-1), yv, 0.0)
        rho[slot] = torch.where(valid, 1.0 / sy.clamp_min(1e-300), 0.0)
        gamma = torch.where(valid, sy / (yv * yv).sum(-1).clamp_min(1e-300), gamma)
        k += 1
        f_prev = f
        f = torch.where(moved, f_new, f)
        g = torch.where(active.unsqueeze(-1), g_new, g)
        loss = torch.where(active, loss_new, loss)
        small = (g.abs().amax(-1) <= gtol) | (moved & ((f_prev - f).abs() <= ftol * f.abs().clamp_min(1.0)))
        converged |= active & small
        active &= ~small & moved
    return LBFGSResult(theta, loss, it, converged)


def _armijo(
    loss_grad: LossGrad,
    penalty: Callable[[torch.Tensor], torch.Tensor],
    zs: list[torch.Tensor],
    dzs: list[torch.Tensor],
    theta: torch.Tensor,
    step: torch.Tensor,
    f0: torch.Tensor,
    gd: torch.Tensor,
    active: torch.Tensor,
    max_halvings: int = 30,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backtracking step sizes ``t`` [B, R] (0 where inactive or no decrease found) and f there."""
    t = torch.ones_like(f0)
    f_at = f0.clone()
    pending = active.clone()
    for _ in range(max_halvings):
        if not bool(pending.any()):
            break
        tt = t.unsqueeze(-1)
        loss, _ = loss_grad([z + tt * dz for z, dz in zip(zs, dzs)])
        ft = loss + penalty(theta + t.unsqueeze(-1) * step)
        ok = pending & (ft <= f0 + 1e-4 * t * gd)
        f_at = torch.where(ok, ft, f_at)
        pending &= ~ok
        t = torch.where(pending, t / 2, t)
    return torch.where(pending | ~active, torch.zeros_like(t), t), f_at
