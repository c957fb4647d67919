"""One L2 logistic regression per attention head, as ITI's head ranking needs.

ITI (Li et al., 2023) fits scikit-learn's ``LogisticRegression(C=1.0)`` on every head separately (1,024
heads for a 7B model), ranks heads by validation accuracy and keeps the top K. Here all heads are
fitted by the family's preconditioned-CG solver (:func:`~intervene.probes.solvers.pcg.fit_pcg`), which
minimises the same objective divided by ``C N`` and stops on scikit-learn's own criterion (largest
gradient component of this mean-scaled objective below ``tol``).

Why that solver (2 shared CPU cores, 4,000 rows x 128 dims per head): a pass over one head's features
costs ~0.05-0.3 ms (cached vs. contended), a full Gram matrix ~1.6 ms, so Newton's method (a weighted
Gram per iteration, ~6 of them) is no faster than scikit-learn's L-BFGS loop (~45-85 ms per head on
``benchmarks/iti_probe_fit.py``'s features); one Gram of a 1,024-row sample as a fixed preconditioner
and ~5 CG iterations of two passes each (~3.1 ms per head on one thread, of which ~1 ms the passes, ~0.4 ms
the Gram matrix; measured on an idle machine, 1,024 heads in 3.17 s against scikit-learn's 43.8 s) are.

Shapes: ``L`` layers, ``H`` heads, ``N`` examples, ``D`` head dim.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from intervene.probes.solvers.pcg import DEFAULT_CHUNK_BYTES, fit_pcg

__all__ = ["HeadProbes", "fit_head_probes"]


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
        x: features ``[*heads, N, D]`` (e.g. ``[L, H, N, D]``), any float dtype (passes in float32).
        y: labels ``[N]`` in {0, 1}, shared by every head.
        C: scikit-learn's inverse regularisation strength (honest_llama uses the default 1.0).
        tol: stop when every gradient component of the mean-scaled objective is below ``tol``
            (scikit-learn's L-BFGS stops on the same quantity with the same default, 1e-4).
        max_iter: conjugate-gradient iterations at most.
        chunk_bytes: bytes of features solved at once.
        precond_rows: rows sampled for the preconditioner's Gram matrix (default ``min(N, 8 D)``).
        seed: seeds that row sample (the result does not depend on it beyond ``tol``).
        n_jobs: chunks of heads solved concurrently, one thread each (default: torch's thread count).

    Returns:
        :class:`HeadProbes` with ``coef`` ``[*heads, D]`` and ``intercept`` ``[*heads]`` (float32).
    """
    if x.ndim < 2:
        raise ValueError(f"x must be [*heads, N, D], got {tuple(x.shape)}")
    heads, (n, d) = x.shape[:-2], x.shape[-2:]
    yf = torch.as_tensor(y).reshape(-1)
    if yf.shape[0] != n:
        raise ValueError(f"y has {yf.shape[0]} labels for {n} examples")
    xb = x.reshape(-1, n, d)
    if xb.dtype == torch.float64:  # honest_llama's probes see float32 activations: keep its precision
        xb = xb.float()
    l2 = torch.full((xb.shape[0], 1), 1.0 / (C * n), dtype=torch.float64)
    # At scikit-learn's loose tolerance ~5 iterations suffice, so a cheaper preconditioner (8 D rows)
    # wins here, unlike at fit_pcg's tight-decrement default.
    fit = fit_pcg(xb, yf, l2, gtol=tol, max_iter=max_iter, chunk_bytes=chunk_bytes,
                  precond_rows=precond_rows or min(n, 8 * d), seed=seed, n_jobs=n_jobs)
    conv = fit.converged[:, 0]
    if not bool(conv.all()):
        warnings.warn(f"{int((~conv).sum())} of {conv.numel()} head probes did not reach tol={tol} in "
                      f"{max_iter} iterations", RuntimeWarning, stacklevel=2)
    return HeadProbes(fit.coef[:, 0].float().reshape(*heads, d), fit.intercept[:, 0].float().reshape(heads),
                      fit.n_iter[:, 0].reshape(heads), conv.reshape(heads))
