"""Logistic-regression probe: scikit-learn's L2 ``LogisticRegression`` objective, batched solvers.

Fitting ``[L, N, D]`` (layers) or ``[L, H, N, D]`` (attention heads, as ITI needs) fits every
probe in one batched solve instead of a Python loop over scikit-learn. Three members of the solver
family (:mod:`intervene.probes.solvers`):

* ``"pcg"`` (:mod:`~intervene.probes.solvers.pcg`): preconditioned nonlinear CG, two passes over the
  features per iteration, ~5-30 iterations whatever the conditioning (the preconditioner is the diagonal,
  or when convergence is slow the whole, of Böhning's ``XᵀX/4`` bound, computed once).
* ``"newton"`` (:mod:`~intervene.probes.solvers.newton`): ~5-10 iterations, each an ``N x D²`` GEMM and
  a ``(D+1)²`` Cholesky solve.
* ``"lbfgs"`` (:mod:`~intervene.probes.solvers.lbfgs`): O(N D) per iteration, but the iteration count
  grows with the conditioning of the features (600-1,700 on anisotropic ones, ours and scikit-learn's).

``solver="auto"`` (:func:`auto_solver`) picks by shape, from measurements on 2 shared CPU cores, one
thread: Newton for ``D <= 16`` with one problem per feature matrix (there it ties with PCG, and its
quadratic convergence is more accurate); PCG everywhere else. PCG was 1.2-2x faster than Newton at
``D = 32..64``, 2.5-5x with cross-validation (``R`` problems sharing one Gram matrix), 3-20x at
``[12, 5000, 768]``; 6x faster than L-BFGS at ``[2000, 2048]`` and 4-5x at ``[120, 4200]``, where
L-BFGS's quasi-Newton decrement also stopped it 1e-5 above the optimum at the default ``tol`` (PCG:
within 1e-10). ``benchmarks/probe_fit.py`` compares it with scikit-learn's per-layer loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from intervene.probes import metrics
from intervene.probes.base import ArrayLike, LinearProbe, as_features, as_labels
from intervene.probes.registry import register_probe
from intervene.probes.solvers.lbfgs import lbfgs_linear
from intervene.probes.solvers.newton import DEFAULT_CHUNK_BYTES, fit_logistic
from intervene.probes.solvers.pcg import fit_pcg

__all__ = ["LogisticRegressionProbe", "auto_solver"]

NEWTON_MAX_DIM = 16  # auto: Newton up to this width (one problem per feature matrix), PCG above


def auto_solver(d: int, problems_per_matrix: int = 1) -> Literal["pcg", "newton"]:
    """The family member ``solver="auto"`` uses for ``D`` features and ``R`` problems sharing each feature
    matrix (cross-validation: ``len(Cs) * cv``); see the module docstring for the measurements."""
    return "newton" if d <= NEWTON_MAX_DIM and problems_per_matrix == 1 else "pcg"


@register_probe("logistic_regression")
class LogisticRegressionProbe(LinearProbe):
    """L2-regularised logistic regression on activations.

    Minimises ``C * sum_i loss_i + |w|^2 / 2`` (scikit-learn's objective; the intercept is not
    penalised), so results match ``sklearn.linear_model.LogisticRegression(C=C)``.

    Args:
        C: inverse regularisation strength (scikit-learn's ``C``).
        Cs: if given, choose ``C`` from these values by ``cv``-fold cross-validation, separately
            for every batch item (all folds x Cs x items are solved in one batched solve).
        cv: number of folds for ``Cs``.
        cv_scoring: ``"log_loss"`` (mean validation log-loss), ``"accuracy"`` or ``"auroc"``.
        fit_intercept: learn an (unpenalised) intercept.
        solver: ``"auto"`` (:func:`auto_solver`), ``"pcg"``, ``"newton"`` or ``"lbfgs"`` (see the
            module docstring).
        max_iter: iterations at most (None: 100 for Newton, 1000 for PCG and L-BFGS).
        tol: stop when the (quasi-)Newton decrement ``g^T H^-1 g / 2``, an estimate of the
            distance to the optimal mean log-loss, is below ``tol`` (PCG's estimate is a lower bound
            and it converges linearly, so it aims at ``tol / 100``: coefficients as accurate as Newton's).
        seed: seeds the cross-validation fold assignment.
        chunk_bytes: features solved at once (keep it cache-sized: each chunk runs to convergence).
            None: the solver's default (4 MiB for PCG, 16 MiB for Newton and L-BFGS).

    Learned attributes:
        coef_ ``[*batch, D]``, intercept_ ``[*batch]``, direction_ ``[*batch, D]`` (unit norm),
        C_ ``[*batch]`` (the C used, chosen by CV if ``Cs``), n_iter_ (iterations of the slowest
        problem), converged_ (all problems converged), cv_scores_ ``[len(Cs), *batch]`` (if ``Cs``;
        higher is better; not saved).
    """

    _tensor_attrs: ClassVar[dict[str, int]] = {"coef_": 1, "intercept_": 0, "C_": 0}
    _meta_attrs: ClassVar[tuple[str, ...]] = ("n_iter_", "converged_")

    def __init__(
        self,
        C: float = 1.0,
        Cs: Sequence[float] | None = None,
        cv: int = 5,
        cv_scoring: Literal["log_loss", "accuracy", "auroc"] = "log_loss",
        fit_intercept: bool = True,
        solver: Literal["auto", "pcg", "newton", "lbfgs"] = "auto",
        max_iter: int | None = None,
        tol: float = 1e-8,
        seed: int = 0,
        chunk_bytes: int | None = None,
    ) -> None:
        self.C = C
        self.Cs = Cs
        self.cv = cv
        self.cv_scoring = cv_scoring
        self.fit_intercept = fit_intercept
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.chunk_bytes = chunk_bytes

    def fit(
        self, x: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None
    ) -> LogisticRegressionProbe:
        """Fit on features ``x`` ``[*batch, N, D]`` and labels ``y`` ``[N]`` or ``[*batch, N]``.

        ``sample_weight`` (``[N]`` or ``[*batch, N]``) scales each sample's loss, as in scikit-learn.
        """
        xt = as_features(x)
        batch = xt.shape[:-2]
        n, d = xt.shape[-2:]
        dev = xt.device
        yt = as_labels(y, xt)
        yt = yt.expand(*batch, n) if yt.ndim == 1 else yt
        if yt.shape[:-1] != batch:
            raise ValueError(f"y's batch dims {tuple(yt.shape[:-1])} do not match x's {tuple(batch)}")
        nb = max(1, batch.numel())
        x_flat, y_flat = xt.reshape(nb, n, d), yt.reshape(nb, n)
        sw = None
        if sample_weight is not None:
            sw_t = torch.as_tensor(sample_weight, dtype=torch.float64).detach().to(dev)
            sw = sw_t.expand(*batch, n).reshape(nb, n)
        if self.Cs is not None:
            c_best, scores = self._cross_validate(x_flat, y_flat, sw)
            self.cv_scores_ = scores.reshape(len(self.Cs), *batch)
        else:
            c_best = torch.full((nb,), float(self.C), dtype=torch.float64, device=dev)
        coef, intercept, n_iter, converged = self._solve(
            x_flat, y_flat, None if sw is None else sw.unsqueeze(1), c_best.unsqueeze(-1)
        )
        self.coef_ = coef[:, 0].to(xt.dtype).reshape(*batch, d)
        self.intercept_ = intercept[:, 0].to(xt.dtype).reshape(batch)
        self.C_ = c_best.reshape(batch)
        self.n_iter_ = n_iter
        self.converged_ = converged
        return self

    def _solve(
        self, x: torch.Tensor, y: torch.Tensor, sw: torch.Tensor | None, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        """Fit ``R`` problems per batch item sharing its features.

        ``x`` [B, N, D], ``y`` [B, N], sample weights ``sw`` [B, R, N] (None: uniform), ``c`` [B, R]
        (the C of each problem). Returns float64 ``coef`` [B, R, D], ``intercept`` [B, R],
        iterations (the slowest problem's) and whether all converged.
        """
        nb, n, d = x.shape
        r = c.shape[-1]
        total = sw.sum(-1) if sw is not None else torch.full_like(c, float(n))  # [B, R]
        l2 = 1.0 / (c * total)  # scikit-learn's C, on the weight-normalised objective
        solver = self.solver if self.solver != "auto" else auto_solver(d, r)
        kw = {} if self.chunk_bytes is None else {"chunk_bytes": self.chunk_bytes}
        if solver == "pcg":
            # Its decrement estimate gᵀP⁻¹g/2 is a lower bound (P bounds the Hessian) and it converges
            # linearly: measured, F - min F is 1.5-4x the estimate, so aim 100x lower for coefficients
            # as accurate as Newton's at the same tol (which overshoots it quadratically).
            res = fit_pcg(x, y, l2, sample_weight=sw, fit_intercept=self.fit_intercept, dtol=self.tol / 100,
                          max_iter=self.max_iter or 1000, **kw)
            return res.coef, res.intercept, int(res.n_iter.max()), bool(res.converged.all())
        if solver == "newton":
            res = fit_logistic(
                x,
                y,
                l2.reshape(-1),
                sample_weight=None if sw is None else sw.reshape(nb * r, n),
                x_index=torch.arange(nb, device=x.device).repeat_interleave(r),
                y_index=torch.arange(nb, device=x.device).repeat_interleave(r),
                fit_intercept=self.fit_intercept,
                max_iter=self.max_iter or 100,
                tol=self.tol,
                **kw,
            )
            coef, intercept = res.coef.reshape(nb, r, d), res.intercept.reshape(nb, r)
            return coef, intercept, int(res.n_iter.max()), bool(res.converged.all())
        if solver != "lbfgs":
            raise ValueError(f"unknown solver {self.solver!r}; use 'auto', 'pcg', 'newton' or 'lbfgs'")
        return self._lbfgs(x, y, sw, l2)

    def _lbfgs(
        self, x: torch.Tensor, y: torch.Tensor, sw: torch.Tensor | None, l2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        """:meth:`_solve` by batched L-BFGS (same arguments, ``l2`` [B, R] in place of ``c``)."""
        nb, n, d = x.shape
        r = l2.shape[-1]
        if sw is None:
            swn = torch.full((nb, r, n), 1.0 / n, dtype=torch.float64, device=x.device)
        else:
            swn = sw / sw.sum(-1, keepdim=True).clamp_min(1e-300)
        theta = torch.zeros(nb, r, d + 1, dtype=torch.float64, device=x.device)
        n_iter, converged = 0, True
        chunk = max(1, (self.chunk_bytes or DEFAULT_CHUNK_BYTES) // max(1, n * d * x.element_size()))
        for start in range(0, nb, chunk):
            sl = slice(start, start + chunk)
            yc, wc = y[sl].double().unsqueeze(-2), swn[sl]  # [Bc, 1, N], [Bc, R, N]

            def loss_grad(zs: list[torch.Tensor], yc=yc, wc=wc) -> tuple[torch.Tensor, list[torch.Tensor]]:
                z = zs[0]
                target = yc.expand_as(z)
                loss = (wc * F.binary_cross_entropy_with_logits(z, target, reduction="none")).sum(-1)
                return loss, [wc * (torch.sigmoid(z) - target)]

            res = lbfgs_linear(
                [x[sl]],
                theta[sl],
                loss_grad,
                l2=l2[sl],
                fit_bias=self.fit_intercept,
                max_iter=self.max_iter or 1000,
                history=10,
                dtol=self.tol,
                ftol=1e-15,
            )
            theta[sl] = res.theta
            n_iter = max(n_iter, res.n_iter)
            converged = converged and bool(res.converged.all())
        return theta[..., :d], theta[..., d], n_iter, converged

    def _cross_validate(
        self, x: torch.Tensor, y: torch.Tensor, sw: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick C per batch item by K-fold CV; returns ``(best C [B], mean scores [len(Cs), B])``.

        Each (C, fold) pair is one more problem on the same features (the folds are 0/1 sample
        weights), so all are solved together without copying the data.
        """
        dev = x.device
        cs = torch.tensor([float(c) for c in self.Cs], dtype=torch.float64, device=dev)  # type: ignore[union-attr]
        nb, n = y.shape
        k = int(self.cv)
        if k < 2 or k > n:
            raise ValueError(f"cv must be between 2 and the number of samples, got {k}")
        shared_y = y[0].cpu() if bool((y == y[:1]).all()) else None
        folds = _stratified_folds(shared_y, n, k, self.seed).to(dev)  # [N]
        train = (folds.unsqueeze(0) != torch.arange(k, device=dev).unsqueeze(1)).double()  # [K, N]
        n_c = cs.shape[0]
        # Problems per item, ordered (C, fold): weights [B, C*K, N], Cs [B, C*K].
        base = train.unsqueeze(0) if sw is None else sw.unsqueeze(1) * train.unsqueeze(0)  # [B or 1, K, N]
        weight = base.expand(nb, k, n).repeat(1, n_c, 1)
        c_per = cs.repeat_interleave(k).expand(nb, -1)
        coef, intercept, _, _ = self._solve(x, y, weight, c_per)
        logits = (x.double() @ coef.transpose(-1, -2)) + intercept.unsqueeze(-2)  # [B, N, C*K]
        logits = logits.reshape(nb, n, n_c, k).permute(2, 3, 0, 1)  # [C, K, B, N]
        scores = torch.empty(n_c, k, nb, dtype=torch.float64, device=dev)
        for fold in range(k):
            val = folds == fold
            yv = y[:, val].double().expand(n_c, nb, -1)
            scores[:, fold] = _cv_score(self.cv_scoring, yv, logits[:, fold][..., val])
        mean = scores.nanmean(1)  # [C, B]
        best = mean.nan_to_num(-torch.inf).argmax(0)
        return cs[best], mean


def _cv_score(kind: str, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Higher-is-better validation score per problem, ``[..., N] -> [...]``."""
    if kind == "log_loss":
        return -F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(-1)
    if kind == "accuracy":
        return torch.as_tensor(metrics.accuracy(y, torch.sigmoid(logits)))
    if kind == "auroc":
        return torch.as_tensor(metrics.auroc(y, logits))
    raise ValueError(f"unknown cv_scoring {kind!r}; use 'log_loss', 'accuracy' or 'auroc'")


def _stratified_folds(y: torch.Tensor | None, n: int, k: int, seed: int) -> torch.Tensor:
    """Fold id per sample: a seeded shuffle, dealt round-robin within each class if ``y`` is shared."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    folds = torch.empty(n, dtype=torch.int64)
    if y is None:
        folds[perm] = torch.arange(n) % k
        return folds
    offset = 0
    for cls in (0, 1):
        members = perm[y[perm] == cls]
        folds[members] = (torch.arange(members.numel()) + offset) % k
        offset += members.numel()
    return folds
