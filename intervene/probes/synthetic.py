"""Synthetic activations with a planted direction, for tests, benchmarks and examples.

Probes should recover the planted unit vector ``direction`` (cosine close to 1, up to sign for
unsupervised probes) whenever the signal dominates the noise.
"""

from __future__ import annotations

import torch

__all__ = ["anisotropic", "planted_features", "planted_pairs"]


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True)


def planted_features(
    n: int,
    d: int,
    *,
    batch: tuple[int, ...] = (),
    margin: float = 3.0,
    noise: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labelled features ``x = noise * eps + (y - 1/2) * margin * direction + offset``.

    Returns:
        ``x`` [*batch, n, d], labels ``y`` [n] (int64, shared by the batch) and the planted unit
        ``direction`` [*batch, d] (one per batch item).
    """
    g = torch.Generator().manual_seed(seed)
    direction = _unit(torch.randn(*batch, d, generator=g, dtype=torch.float64))
    y = torch.randint(0, 2, (n,), generator=g)
    offset = torch.randn(*batch, 1, d, generator=g, dtype=torch.float64)
    eps = torch.randn(*batch, n, d, generator=g, dtype=torch.float64)
    signal = (y.double() - 0.5).unsqueeze(-1) * margin * direction.unsqueeze(-2)
    x = noise * eps + signal + offset
    return x.to(dtype), y, direction.to(dtype)


def planted_pairs(
    n: int,
    d: int,
    *,
    batch: tuple[int, ...] = (),
    margin: float = 3.0,
    noise: float = 0.5,
    content: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contrast pairs: a statement answered "yes" (``x_pos``) and "no" (``x_neg``).

    Both sides share the question's content (``content * c``, in every direction), each side has
    its own constant offset (the pseudo-label: which answer was appended), and the truth ``y``
    moves the two sides in opposite directions along the planted ``direction``:
    ``x_pos = c + mu_pos + (y - 1/2) * margin * direction + noise * eps``, ``x_neg`` with ``-``.

    Returns:
        ``x_pos``, ``x_neg`` [*batch, n, d], ``y`` [n] (int64), ``direction`` [*batch, d].
    """
    g = torch.Generator().manual_seed(seed)
    direction = _unit(torch.randn(*batch, d, generator=g, dtype=torch.float64))
    y = torch.randint(0, 2, (n,), generator=g)
    c = content * torch.randn(*batch, n, d, generator=g, dtype=torch.float64)
    mu_pos = 3 * torch.randn(*batch, 1, d, generator=g, dtype=torch.float64)
    mu_neg = 3 * torch.randn(*batch, 1, d, generator=g, dtype=torch.float64)
    signal = (y.double() - 0.5).unsqueeze(-1) * margin * direction.unsqueeze(-2)
    x_pos = c + mu_pos + signal + noise * torch.randn(*batch, n, d, generator=g, dtype=torch.float64)
    x_neg = c + mu_neg - signal + noise * torch.randn(*batch, n, d, generator=g, dtype=torch.float64)
    return x_pos.to(dtype), x_neg.to(dtype), y, direction.to(dtype)


def anisotropic(
    x: torch.Tensor, *, decay: float = 0.7, massive: int = 3, massive_scale: float = 20.0, seed: int = 0
) -> torch.Tensor:
    """Give features a residual-stream-like spectrum: scale dim ``i`` by ``10 * (i + 1) ** -decay``,
    the first ``massive`` dims by another ``massive_scale`` ("massive activations"), then rotate by
    a random orthogonal matrix. Badly conditioned, as real activations are; first-order solvers
    (L-BFGS) need many more iterations on such features than on isotropic ones.

    Args:
        x: features ``[..., D]``. Returns the transformed features, same shape and dtype.
    """
    d = x.shape[-1]
    g = torch.Generator().manual_seed(seed)
    scale = 10 * torch.arange(1, d + 1, dtype=torch.float64) ** -decay
    scale[:massive] *= massive_scale
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return ((x.double() * scale) @ q.T).to(x.dtype)
