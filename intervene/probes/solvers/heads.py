"""One L2 logistic regression per attention head, as ITI's head ranking needs.

ITI (Li et al., 2023) fits scikit-learn's ``LogisticRegression(C=1.0)`` on every head separately (1,024
heads for a 7B model), ranks heads by validation accuracy and keeps the top K. Here every head is
fitted by the family's preconditioned-CG method in its one-problem-per-matrix form
(:func:`~intervene.probes.solvers.pcg_single.fit_pcg_single`), which minimises the same objective divided
by ``C N`` and stops on scikit-learn's own criterion (largest gradient component of this mean-scaled
objective below ``tol``).

Why that solver (4,000 rows x 128 dims per head, one core): scikit-learn's L-BFGS needs ~75-160 steps
per head on badly conditioned features (~43 ms per head on ``benchmarks/iti_probe_fit.py``'s). With
Böhning's bound from all rows as the preconditioner (one ``syrk``, ~0.85 ms) CG stops after ~2 iterations
of two ~35 µs passes; the batched form of the same method (``fit_pcg``: a 1,024-row sample, ~5
iterations, every operation over a chunk of heads) took 3.17 s for the 1,024 heads, this one ~1.6 s,
because there the cost was per-operation overhead rather than arithmetic.

Shapes: ``L`` layers, ``H`` heads, ``N`` examples, ``D`` head dim.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from intervene.probes.solvers.pcg_single import fit_pcg_single

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
                    max_iter: int = 200, n_jobs: int | None = None) -> HeadProbes:
    """Fit one L2 logistic regression per head.

    Args:
        x: features ``[*heads, N, D]`` (e.g. ``[L, H, N, D]``), any float dtype (solved in float32; float64
            in float64).
        y: labels ``[N]`` in {0, 1}, shared by every head.
        C: scikit-learn's inverse regularisation strength (honest_llama uses the default 1.0).
        tol: stop when every gradient component of the mean-scaled objective is below ``tol``
            (scikit-learn's L-BFGS stops on the same quantity with the same default, 1e-4).
        max_iter: conjugate-gradient iterations at most.
        n_jobs: heads solved concurrently, one thread each (default: torch's thread count).

    Returns:
        :class:`HeadProbes` with ``coef`` ``[*heads, D]`` and ``intercept`` ``[*heads]`` (float32).
    """
    if x.ndim < 2:
        raise ValueError(f"x must be [*heads, N, D], got {tuple(x.shape)}")
    heads, (n, d) = x.shape[:-2], x.shape[-2:]
    yf = torch.as_tensor(y).reshape(-1)
    if yf.shape[0] != n:
        raise ValueError(f"y has {yf.shape[0]} labels for {n} examples")
    if C <= 0:
        raise ValueError(f"C must be positive, got {C}")
    xb = x.reshape(-1, n, d)
    if xb.dtype == torch.float64:  # honest_llama's probes see float32 activations: keep its precision
        xb = xb.float()
    coef, icpt, iters, conv = fit_pcg_single(xb, yf, 1.0 / (C * n), gtol=tol, max_iter=max_iter, n_jobs=n_jobs)
    if not bool(conv.all()):
        warnings.warn(f"{int((~conv).sum())} of {conv.numel()} head probes did not reach tol={tol} in "
                      f"{max_iter} iterations", RuntimeWarning, stacklevel=2)
    return HeadProbes(coef.float().reshape(*heads, d), icpt.float().reshape(heads), iters.reshape(heads),
                      conv.reshape(heads))
