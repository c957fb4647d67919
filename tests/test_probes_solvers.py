"""The logistic-regression solver family against scikit-learn: every ``solver="auto"`` path, PCG's options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from intervene import probes
from intervene.probes.lr import auto_solver
from intervene.probes.solvers import fit_pcg, precond
from intervene.probes.synthetic import anisotropic, planted_features


def _sklearn(x: torch.Tensor, y: torch.Tensor, C: float = 1.0, sw: torch.Tensor | None = None,
             fit_intercept: bool = True, solver: str = "newton-cholesky") -> LogisticRegression:
    """scikit-learn at its optimum: float64, a tight tolerance, one BLAS thread (fast on shared cores),
    its Newton solver by default (its lbfgs needs ~4,000 iterations on the anisotropic features here)."""
    with threadpool_limits(1):
        return LogisticRegression(C=C, tol=1e-10, max_iter=20000, fit_intercept=fit_intercept,
                                  solver=solver).fit(
            x.double().numpy(), y.numpy(), sample_weight=None if sw is None else sw.double().numpy())


def _objective(x: torch.Tensor, y: torch.Tensor, coef, intercept, C: float = 1.0,
               sw: torch.Tensor | None = None) -> float:
    """scikit-learn's objective divided by ``C * sum(sw)``: weighted mean log-loss + |w|^2 / (2 C sum(sw))."""
    sw = torch.ones(x.shape[0], dtype=torch.float64) if sw is None else sw.double()
    w = torch.as_tensor(np.asarray(coef), dtype=torch.float64).reshape(-1)
    z = x.double() @ w + float(intercept)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y.double(), weight=sw, reduction="sum")
    return float((loss + 0.5 * (w * w).sum() / C) / sw.sum())


def _assert_matches(ours_coef, ours_icpt, ref: LogisticRegression, x, y, C=1.0, sw=None) -> None:
    """Our solution is scikit-learn's optimum: the objective within 1e-8 (ours may be lower by rounding),
    coefficients as in tests/test_probes.py (rtol 1e-3, atol 1e-4), logits within 1e-3 (on features with
    a large mean, the intercept alone is ill-determined)."""
    ours = _objective(x, y, ours_coef, ours_icpt, C, sw)
    best = _objective(x, y, ref.coef_[0], ref.intercept_[0], C, sw)
    assert ours - best < 1e-8
    coef = np.asarray(ours_coef, dtype=np.float64).reshape(-1)
    np.testing.assert_allclose(coef, ref.coef_[0], rtol=1e-3, atol=1e-4)
    logits = x.double().numpy() @ coef + float(ours_icpt)
    np.testing.assert_allclose(logits, ref.decision_function(x.double().numpy()), atol=1e-3)


# ---- solver="auto": one test per path it can take ------------------------------------------------
@pytest.mark.parametrize(("n", "d", "C", "expected"), [(300, 8, 0.5, "newton"), (600, 48, 1.0, "pcg"),
                                                       (2000, 300, 0.1, "pcg")])
def test_auto_solver_reaches_the_sklearn_optimum(n: int, d: int, C: float, expected: str) -> None:
    assert auto_solver(d) == expected
    x, y, _ = planted_features(n, d, batch=(2,), margin=1.5, seed=11)
    xa = anisotropic(x)  # badly conditioned: PCG upgrades to the full Gram matrix at D = 300
    probe = probes.LogisticRegressionProbe(C=C).fit(xa, y)
    assert probe.converged_
    for i in range(2):
        _assert_matches(probe.coef_[i], probe.intercept_[i], _sklearn(xa[i], y, C), xa[i], y, C)


def test_auto_solver_wide_features_reach_the_sklearn_optimum() -> None:
    # More features than examples: the diagonal preconditioner suffices, no D x D matrix is formed.
    d = 4200
    assert auto_solver(d) == "pcg"
    x, y, _ = planted_features(120, d, margin=3.0, seed=12)
    probe = probes.LogisticRegressionProbe(C=0.01).fit(x, y)
    ref = _sklearn(x, y, 0.01, solver="lbfgs")  # its Newton would factor a 4200 x 4200 Hessian
    _assert_matches(probe.coef_, probe.intercept_, ref, x, y, 0.01)


def test_auto_cross_validation_uses_pcg_and_matches_sklearn_fold_scores() -> None:
    # Several problems per feature matrix (folds x Cs) take PCG's shared-eigenbasis path even at D <= 16.
    cs, k = [0.05, 1.0], 3
    assert auto_solver(12, len(cs) * k) == "pcg"
    x, y, _ = planted_features(240, 12, margin=1.0, seed=13)
    probe = probes.LogisticRegressionProbe(Cs=cs, cv=k, seed=0).fit(x, y)
    from intervene.probes.lr import _stratified_folds

    folds = _stratified_folds(y, 240, k, 0)
    for ci, c in enumerate(cs):
        losses = []
        for f in range(k):
            tr, va = folds != f, folds == f
            ref = _sklearn(x[tr], y[tr], c)
            proba = ref.predict_proba(x[va].double().numpy())[:, 1]
            yv = y[va].numpy()
            losses.append(-np.mean(yv * np.log(proba) + (1 - yv) * np.log(1 - proba)))
        assert abs(float(probe.cv_scores_[ci]) + np.mean(losses)) < 1e-5
    best = cs[int(np.argmax(probe.cv_scores_.numpy()))]
    _assert_matches(probe.coef_, probe.intercept_, _sklearn(x, y, best), x, y, best)


# ---- PCG's options --------------------------------------------------------------------------------
@pytest.mark.parametrize("full_gram", [True, False])
def test_pcg_sample_weight_and_preconditioners_reach_the_sklearn_optimum(full_gram: bool, monkeypatch) -> None:
    x, y, _ = planted_features(400, 40, margin=1.0, seed=14)
    xa = anisotropic(x)
    sw = torch.rand(400, generator=torch.Generator().manual_seed(1)) * 2
    factored = []
    real = precond.Preconditioner._factor
    monkeypatch.setattr(precond.Preconditioner, "_factor", lambda self: factored.append(1) or real(self))
    n = 400
    l2 = torch.tensor([[1.0 / (0.5 * float(sw.double().sum()))]], dtype=torch.float64)
    fit = fit_pcg(xa[None], y, l2, sample_weight=sw.double().view(1, 1, n), dtol=1e-10, full_gram=full_gram)
    assert bool(fit.converged.all())
    # The diagonal start is too slow on anisotropic features, so it upgrades to the full Gram matrix.
    assert len(factored) == 1
    ref = _sklearn(xa, y, 0.5, sw)
    _assert_matches(fit.coef[0, 0], fit.intercept[0, 0], ref, xa, y, 0.5, sw)


def test_pcg_diagonal_preconditioner_suffices_on_isotropic_features(monkeypatch) -> None:
    x, y, _ = planted_features(3000, 260, margin=2.0, seed=15)
    factored = []
    real = precond.Preconditioner._factor
    monkeypatch.setattr(precond.Preconditioner, "_factor", lambda self: factored.append(1) or real(self))
    probe = probes.LogisticRegressionProbe(solver="pcg").fit(x, y)
    assert not factored  # no Gram matrix was computed
    _assert_matches(probe.coef_, probe.intercept_, _sklearn(x, y), x, y)


def test_pcg_without_intercept_and_in_float64_matches_sklearn() -> None:
    x, y, _ = planted_features(500, 20, margin=1.5, seed=16, dtype=torch.float64)
    probe = probes.LogisticRegressionProbe(solver="pcg", fit_intercept=False, C=0.3).fit(x, y)
    assert probe.coef_.dtype == torch.float64 and float(probe.intercept_) == 0.0
    ref = _sklearn(x, y, 0.3, fit_intercept=False)
    _assert_matches(probe.coef_, 0.0, ref, x, y, 0.3)
    # float64 features are passed over in float64: a tolerance below float32's noise floor is reachable.
    tight = probes.LogisticRegressionProbe(solver="pcg", fit_intercept=False, C=0.3, tol=1e-14).fit(x, y)
    assert tight.converged_
    np.testing.assert_allclose(tight.coef_.numpy(), ref.coef_[0], rtol=1e-6, atol=1e-7)


def test_pcg_several_problems_per_matrix_equal_separate_fits() -> None:
    # R problems sharing one feature matrix (different C and 0/1 weights) vs one sklearn fit each.
    x, y, _ = planted_features(300, 24, margin=1.0, seed=17)
    mask = (torch.arange(300) % 3 != 0).double()
    weights = torch.stack([torch.ones(300, dtype=torch.float64), mask, mask])  # [R, N]
    cs = torch.tensor([1.0, 1.0, 0.05], dtype=torch.float64)
    l2 = (1.0 / (cs * weights.sum(-1))).unsqueeze(0)
    fit = fit_pcg(x[None], y, l2, sample_weight=weights[None], dtol=1e-10)
    for r in range(3):
        keep = weights[r] > 0
        ref = _sklearn(x[keep], y[keep], float(cs[r]))
        _assert_matches(fit.coef[0, r], fit.intercept[0, r], ref, x[keep], y[keep], float(cs[r]))


def test_pcg_stops_at_the_float32_noise_floor() -> None:
    # A tolerance float32 passes cannot reach: stop early (not converged) instead of running max_iter,
    # still at scikit-learn's optimum to float32 accuracy.
    x, y, _ = planted_features(2000, 64, margin=2.0, seed=18)
    xa = anisotropic(x)
    fit = fit_pcg(xa[None], y, torch.tensor([[1 / 2000.0]], dtype=torch.float64), dtol=1e-16, max_iter=500)
    assert int(fit.n_iter) < 200
    ref = _sklearn(xa, y)
    assert _objective(xa, y, fit.coef[0, 0], fit.intercept[0, 0]) - _objective(
        xa, y, ref.coef_[0], ref.intercept_[0]) < 1e-9


def test_pcg_rejects_bad_arguments() -> None:
    x = torch.randn(1, 10, 3)
    y = torch.arange(10) % 2
    with pytest.raises(ValueError, match="gtol or dtol"):
        fit_pcg(x, y, torch.ones(1, 1))
    with pytest.raises(ValueError, match="l2"):
        fit_pcg(x, y, torch.ones(2, 1), dtol=1e-8)
    with pytest.raises(ValueError, match="sample_weight"):
        fit_pcg(x, y, torch.ones(1, 1), sample_weight=torch.ones(1, 2, 10), dtol=1e-8)


# ---- the one-problem-per-matrix form (ITI's head probes) ----------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pcg_single_reaches_the_sklearn_optimum(dtype: torch.dtype) -> None:
    # Badly conditioned features with massive dims (|x| up to 580: the centring of the Gram matrix cancels
    # digits there) and a non-default C; a gradient tolerance just above float32's noise floor (1e-7 is
    # below it on these features).
    from intervene.probes.solvers.pcg_single import fit_pcg_single

    x, y, _ = planted_features(600, 24, batch=(3,), margin=1.5, seed=21)
    xa = anisotropic(x).to(dtype)
    coef, icpt, iters, conv = fit_pcg_single(xa, y, 1 / (0.3 * 600), gtol=1e-6 if dtype == torch.float32 else 1e-12)
    assert bool(conv.all()) and coef.dtype == torch.float64 and coef.shape == (3, 24)
    for i in range(3):
        _assert_matches(coef[i], icpt[i], _sklearn(xa[i], y, 0.3), xa[i], y, 0.3)


def test_pcg_single_agrees_with_the_batched_form_and_across_threads() -> None:
    from intervene.probes.solvers.pcg_single import fit_pcg_single

    x, y, _ = planted_features(800, 32, batch=(6,), margin=1.0, seed=22)
    xa = anisotropic(x)
    l2 = 1 / 800
    one = fit_pcg_single(xa, y, l2, gtol=1e-6, n_jobs=1)
    two = fit_pcg_single(xa, y, l2, gtol=1e-6, n_jobs=2)
    for a, b in zip(one, two):  # each matrix is solved by one thread in the same order of operations
        assert torch.equal(a, b)
    batched = fit_pcg(xa, y, torch.full((6, 1), l2, dtype=torch.float64), gtol=1e-6)
    torch.testing.assert_close(one[0], batched.coef[:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(one[1], batched.intercept[:, 0], atol=1e-5, rtol=1e-4)
    assert bool(one[3].all()) and bool(batched.converged.all())
    assert float(one[2].float().mean()) < float(batched.n_iter.float().mean())  # the full-rows preconditioner


def test_pcg_single_on_degenerate_features() -> None:
    # Constant and duplicated columns (a singular Gram matrix: the penalty keeps P definite), separable
    # labels, an all-zero matrix, and NaN features: every matrix ends; the NaN one reports "not converged".
    from intervene.probes.solvers.pcg_single import fit_pcg_single

    n = 200
    y = torch.arange(n) % 2
    base = torch.randn(n, 5, generator=torch.Generator().manual_seed(3))
    dup = torch.cat([base[:, :3], base[:, :2], torch.full((n, 1), 7.0)], 1)
    separable = torch.randn(n, 6, generator=torch.Generator().manual_seed(4))
    separable[:, 0] = (2 * y - 1) * 5.0
    nan = torch.randn(n, 6)
    nan[3, 2] = float("nan")
    x = torch.stack([dup, separable, torch.zeros(n, 6), nan])
    coef, icpt, iters, conv = fit_pcg_single(x, y, 1 / n, gtol=1e-6)
    assert conv[:3].tolist() == [True, True, True] and not bool(conv[3])
    for i in range(3):
        _assert_matches(coef[i], icpt[i], _sklearn(x[i], y), x[i], y)


def test_head_probes_warn_when_not_converged() -> None:
    from intervene.probes.solvers import fit_head_probes

    x = torch.randn(2, 100, 4)
    x[1, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="1 of 2 head probes did not reach"):
        fit = fit_head_probes(x, torch.arange(100) % 2)
    assert fit.converged.tolist() == [True, False]
    with pytest.raises(ValueError, match="C must be positive"):
        fit_head_probes(x, torch.arange(100) % 2, C=0.0)


def test_pcg_single_stops_at_the_float32_noise_floor() -> None:
    # A gradient tolerance float32 passes cannot reach: stop once the gradient stops improving (not
    # converged) instead of running max_iter, at scikit-learn's optimum to float32 accuracy.
    from intervene.probes.solvers.pcg_single import STALL, fit_pcg_single

    x, y, _ = planted_features(2000, 64, margin=2.0, seed=18)
    xa = anisotropic(x)
    coef, icpt, iters, conv = fit_pcg_single(xa[None], y, 1 / 2000, gtol=1e-12, max_iter=500)
    assert not bool(conv[0]) and int(iters[0]) < 100
    reached = fit_pcg_single(xa[None], y, 1 / 2000, gtol=1e-6, max_iter=500)
    assert bool(reached[3][0]) and int(iters[0]) >= int(reached[2][0]) + STALL
    ref = _sklearn(xa, y)
    assert _objective(xa, y, coef[0], icpt[0]) - _objective(xa, y, ref.coef_[0], ref.intercept_[0]) < 1e-9
