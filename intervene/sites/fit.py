"""Exact fits of one residual step: ``target = r * base + Σ g_j * writer_j (+ c)``, for :mod:`intervene.sites.chain`.

The values are one block's float32 re-run (:func:`intervene.sites.block.rerun`) in float64, ``[tokens,
hidden]`` after flattening. The simplest form that holds to within the rounding allowance at *every*
element wins: a plain sum, then constants, then one coefficient per hidden channel (each channel its own
least-squares fit over the probe's tokens), each without and with a per-channel offset. A fit whose
columns are (to rounding) linearly dependent is refused: its coefficients would not be determined.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from intervene.sites.residual import Gain, gain_tensor

_SCREEN = 16  # channels tried first in a per-channel fit


@dataclass(frozen=True)
class Fit:
    """The coefficients of one step: of its base, of each writer, and its offset (``None``: none)."""

    resid: Gain
    gains: tuple[Gain, ...]
    offset: tuple[float, ...] | None


def gain(v: torch.Tensor) -> Gain:
    """A per-channel coefficient vector as one constant when it is one (exactly 1.0 for 1)."""
    mean = float(v.mean())
    if float(v.max() - v.min()) <= 1e-6 * max(abs(mean), 1.0):
        return 1.0 if abs(mean - 1.0) <= 1e-6 else mean
    return tuple(float(c) for c in v)


def fit_step(target: torch.Tensor, base: torch.Tensor, writers: list[torch.Tensor], tol: float) -> Fit | None:
    """``target = r * base + Σ g_j * writers_j (+ c)`` to within ``tol`` at every element, trying the
    simplest form first: a plain sum, constants, then per-channel vectors, each without and with a
    per-channel offset ``c``. Every coefficient must be clearly nonzero: a writer scaled by nothing, or a
    residual that is dropped, is not what the step says."""
    h = target.shape[-1]
    t = target.reshape(-1, h)
    cols = torch.stack([base.reshape(-1, h)] + [w.reshape(-1, h) for w in writers], -1)  # [tokens, h, k]
    k = cols.shape[-1]
    d = t - cols.sum(-1)
    if float(d.abs().max()) <= tol:
        return Fit(1.0, (1.0,) * (k - 1), None)
    for per_channel, offset in ((False, False), (False, True), (True, False), (True, True)):
        if per_channel and t.shape[0] < 2 * (k + offset):
            continue  # too few tokens to pin down per-channel coefficients
        if per_channel and h > _SCREEN and not _fits(t[:, :_SCREEN], cols[:, :_SCREEN], offset, tol):
            continue  # each channel is its own fit: a few channels that fail settle it, cheaply
        coef, c = _solve(t, cols, per_channel, offset)
        if coef is None or bool((coef.abs() < 1e-3).any()):
            continue
        fitted = (cols * coef).sum(-1) + (torch.zeros(h, dtype=t.dtype) if c is None else c)
        if float((fitted - t).abs().max()) > tol or _degenerate(cols, per_channel, offset):
            continue
        # report a per-channel vector as one constant where it is one, if that still fits
        gains = [gain(coef[:, j]) for j in range(k)]
        off = None if c is None else gain(c)
        fitted = torch.stack([gain_tensor(g, h) * cols[..., j] for j, g in enumerate(gains)]).sum(0) + (
            torch.zeros(h, dtype=t.dtype) if off is None else gain_tensor(off, h))
        if float((fitted - t).abs().max()) > tol:
            gains = [tuple(float(v) for v in coef[:, j]) for j in range(k)]
            off = None if c is None else tuple(float(v) for v in c)
        return Fit(gains[0], tuple(gains[1:]), None if off is None else tuple(gain_tensor(off, h).tolist()))
    return None


def _fits(t: torch.Tensor, cols: torch.Tensor, offset: bool, tol: float) -> bool:
    """Whether a per-channel fit on these channels is within ``tol``."""
    coef, c = _solve(t, cols, True, offset)
    if coef is None:
        return False
    fitted = (cols * coef).sum(-1) + (0.0 if c is None else c)
    return float((fitted - t).abs().max()) <= tol


def _solve(t: torch.Tensor, cols: torch.Tensor, per_channel: bool,
           offset: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Least squares (normal equations: at most five unknowns, and the fit is checked afterwards) for
    the coefficients (``[h, k]``, equal rows unless per channel) and the offset (``[h]``); ``None``
    when the columns are degenerate."""
    n, h, k = cols.shape
    if per_channel:
        a = cols.permute(1, 0, 2)  # [h, tokens, k]
        if offset:
            a = torch.cat([a, torch.ones(h, n, 1, dtype=a.dtype)], -1)
        sol = _normal(a, t.t().unsqueeze(-1))
        if sol is None:
            return None, None
        return sol[:, :k, 0], (sol[:, k, 0] if offset else None)
    if offset:  # constants for the columns, a free offset per channel: fit on per-channel-centred values
        tc, cc = t - t.mean(0), cols - cols.mean(0)
        sol = _normal(cc.reshape(-1, k), tc.reshape(-1, 1))
        if sol is None:
            return None, None
        coef = sol[:, 0]
        return coef.expand(h, k), t.mean(0) - (cols.mean(0) * coef).sum(-1)
    sol = _normal(cols.reshape(-1, k), t.reshape(-1, 1))
    return (None, None) if sol is None else (sol[:, 0].expand(h, k), None)


def _degenerate(cols: torch.Tensor, per_channel: bool, offset: bool) -> bool:
    """Whether a column is (to rounding) a combination of the others, so that the coefficients are not
    determined: a residual state offered as a writer of the step that produces it, say."""
    n, h, k = cols.shape
    a = cols.permute(1, 0, 2) if per_channel else cols.reshape(1, -1, k)  # [batches, rows, k]
    if offset:
        a = a - a.mean(1, keepdim=True)
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)
    sv = torch.linalg.svdvals(a)
    return bool((sv[:, -1] <= 1e-5 * sv[:, 0]).any())


def _normal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``argmin |a s - b|`` by the normal equations (batched), ``None`` if ``aᵀa`` is singular."""
    sol, info = torch.linalg.solve_ex(a.mT @ a, a.mT @ b)
    return None if bool((info != 0).any()) or not bool(torch.isfinite(sol).all()) else sol
