"""Probe math: agreement with scikit-learn, planted-direction recovery, calibration, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score

from intervene import probes
from intervene.probes.synthetic import planted_features, planted_pairs

SUPERVISED = [
    lambda: probes.LogisticRegressionProbe(C=1.0),
    lambda: probes.LogisticRegressionProbe(C=1.0, solver="lbfgs"),
    lambda: probes.LogisticRegressionProbe(C=1.0, solver="pcg"),
    lambda: probes.MeanDiffProbe(),
    lambda: probes.LDAProbe(),
]
UNSUPERVISED = [
    lambda: probes.CCSProbe(n_restarts=3),
    lambda: probes.CRCProbe(method="vinc"),
    lambda: probes.CRCProbe(method="pca"),
]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@pytest.mark.parametrize("solver", ["auto", "pcg", "newton", "lbfgs"])
@pytest.mark.parametrize("C", [1.0, 0.01])
def test_lr_matches_sklearn(C: float, solver: str) -> None:
    # A noisy, non-separable problem with correlated features, so regularisation matters.
    g = torch.Generator().manual_seed(0)
    n, d = 1000, 24
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=g) @ mix
    w = torch.randn(d, generator=g)
    y = (torch.sigmoid(x @ w * 0.4 + 0.5) > torch.rand(n, generator=g)).long()
    xtr, ytr, xva, yva = x[:600], y[:600], x[600:], y[600:]
    ours = probes.LogisticRegressionProbe(C=C, solver=solver).fit(xtr, ytr)
    # float64 for scikit-learn: its lbfgs keeps float32 inputs in float32 and stops early.
    ref = LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(xtr.double().numpy(), ytr.numpy())
    ours_auc = roc_auc_score(yva.numpy(), ours.decision_function(xva).numpy())
    ref_auc = roc_auc_score(yva.numpy(), ref.decision_function(xva.double().numpy()))
    assert abs(ours_auc - ref_auc) < 0.01
    ours_acc = float(ours.score(xva, yva))
    ref_acc = accuracy_score(yva.numpy(), ref.predict(xva.double().numpy()))
    assert abs(ours_acc - ref_acc) <= 0.01
    # Same objective, so the solutions agree far more tightly than the tolerance above.
    np.testing.assert_allclose(ours.coef_.numpy(), ref.coef_[0], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(float(ours.intercept_), ref.intercept_[0], rtol=1e-3, atol=1e-4)
    assert ours.converged_


def test_lr_sample_weight_matches_sklearn() -> None:
    x, y, _ = planted_features(300, 8, margin=1.0, seed=3)
    sw = torch.rand(300, generator=torch.Generator().manual_seed(1)) * 2
    ours = probes.LogisticRegressionProbe(C=0.5).fit(x, y, sample_weight=sw)
    ref = LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit(
        x.double().numpy(), y.numpy(), sample_weight=sw.double().numpy()
    )
    np.testing.assert_allclose(ours.coef_.numpy(), ref.coef_[0], rtol=1e-3, atol=1e-4)


def test_lr_cross_validation_picks_strong_regularisation_on_noise() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 200, 10, generator=g)
    y = torch.randint(0, 2, (2, 200), generator=g)  # labels unrelated to x
    probe = probes.LogisticRegressionProbe(Cs=[1e-4, 1e-2, 1.0, 100.0], cv=4).fit(x, y)
    assert probe.C_.shape == (2,)
    lbfgs = probes.LogisticRegressionProbe(Cs=[1e-4, 1e-2, 1.0, 100.0], cv=4, solver="lbfgs").fit(x, y)
    torch.testing.assert_close(lbfgs.cv_scores_, probe.cv_scores_, atol=1e-4, rtol=1e-4)
    assert torch.all(probe.C_ <= 1e-2)
    assert probe.cv_scores_.shape == (4, 2)
    # With signal, weak regularisation wins.
    x, y, _ = planted_features(300, 5, margin=4.0, seed=2)
    probe = probes.LogisticRegressionProbe(Cs=[1e-4, 1.0], cv=3).fit(x, y)
    assert float(probe.C_) == 1.0


@pytest.mark.parametrize("make", SUPERVISED)
def test_supervised_probes_recover_planted_direction(make) -> None:
    x, y, direction = planted_features(800, 16, margin=3.0, seed=1)
    probe = make().fit(x, y)
    assert probe.direction_.shape == (16,)
    torch.testing.assert_close(probe.direction_.norm(), torch.tensor(1.0))
    assert float(_cos(probe.direction_, direction)) > 0.9
    assert probes.auroc(y, probe.predict_proba(x)) > 0.95
    assert float(probe.score(x, y)) > 0.9


@pytest.mark.parametrize("make", UNSUPERVISED)
def test_unsupervised_probes_recover_direction_and_calibration_fixes_sign(make) -> None:
    xp, xn, y, direction = planted_pairs(600, 16, seed=4)
    probe = make().fit(xp, xn)
    assert abs(float(_cos(probe.direction_, direction))) > 0.9  # sign is arbitrary before calibration
    probe.calibrate(xp, xn, y)
    assert float(_cos(probe.direction_, direction)) > 0.9
    assert probes.auroc(y, probe.predict_proba(xp, xn)) > 0.95
    assert float(probe.score(xp, xn, y)) > 0.9


@pytest.mark.parametrize("make", SUPERVISED)
def test_calibration_flips_an_anticorrelated_probe(make) -> None:
    x, y, direction = planted_features(500, 8, seed=5)
    probe = make().fit(x, 1 - y)  # trained on inverted labels: points the wrong way
    assert float(_cos(probe.direction_, direction)) < -0.9
    probes.calibrate(probe, x, y)
    assert float(_cos(probe.direction_, direction)) > 0.9
    assert float(probe.score(x, y)) > 0.9


def test_platt_calibration_standalone() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2000, generator=g)
    y = (torch.rand(2000, generator=g) < torch.sigmoid(-2.0 * s + 0.5)).long()
    cal = probes.PlattCalibration().fit(s, y)
    assert abs(float(cal.scale_) + 2.0) < 0.3 and abs(float(cal.bias_) - 0.5) < 0.2
    assert cal.predict_proba(s).shape == (2000,)


@pytest.mark.parametrize("make", SUPERVISED + UNSUPERVISED)
def test_batched_fit_equals_per_item_fit(make) -> None:
    if make().n_inputs == 2:
        xp, xn, y, _ = planted_pairs(300, 8, batch=(3,), seed=6)
        inputs, per_item = (xp, xn), [(xp[i], xn[i]) for i in range(3)]
        fit_args: tuple = ()
    else:
        x, y, _ = planted_features(300, 8, batch=(3,), seed=6)
        inputs, per_item = (x,), [(x[i],) for i in range(3)]
        fit_args = (y,)
    batched = make().fit(*inputs, *fit_args)
    assert batched.batch_shape_ == (3,)
    assert batched.direction_.shape == (3, 8)
    scores = batched.decision_function(*inputs)
    assert scores.shape == (3, 300)
    for i, xs in enumerate(per_item):
        single = make().fit(*xs, *fit_args)
        torch.testing.assert_close(batched.direction_[i], single.direction_, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            batched[i].decision_function(*xs), single.decision_function(*xs), atol=1e-3, rtol=1e-4
        )
        torch.testing.assert_close(scores[i], single.decision_function(*xs), atol=1e-3, rtol=1e-4)


def test_lr_batched_over_layers_and_heads() -> None:
    x, y, direction = planted_features(400, 6, batch=(2, 3), seed=7)
    probe = probes.LogisticRegressionProbe().fit(x, y)
    assert probe.coef_.shape == (2, 3, 6) and probe.intercept_.shape == (2, 3)
    assert torch.all(_cos(probe.direction_, direction) > 0.9)
    head = probe[1, 2]
    single = probes.LogisticRegressionProbe().fit(x[1, 2], y)
    torch.testing.assert_close(head.coef_, single.coef_, atol=1e-4, rtol=1e-4)
    assert probe.select(1).coef_.shape == (3, 6)
    assert probe[:, 1:].coef_.shape == (2, 2, 6)
    # Per-item labels, and one [N, D] input scored by every probe of the batch.
    yb = torch.stack([y, 1 - y]).unsqueeze(1).expand(2, 3, -1)
    flipped = probes.LogisticRegressionProbe().fit(x, yb)
    assert torch.all(_cos(flipped.direction_[1], direction[1]) < -0.9)
    assert probe.predict_proba(x[0, 0]).shape == (2, 3, 400)


def test_inputs_numpy_and_float64() -> None:
    x, y, direction = planted_features(300, 5, seed=8, dtype=torch.float64)
    probe = probes.MeanDiffProbe().fit(x.numpy(), y.numpy())
    assert probe.coef_.dtype == torch.float64
    assert probe.predict(x.numpy()).dtype == torch.int64
    assert float(_cos(probe.direction_, direction)) > 0.9


def test_sklearn_conventions() -> None:
    probe = probes.LogisticRegressionProbe(C=0.3)
    assert not hasattr(probe, "coef_")  # no work in __init__
    assert probe.get_params()["C"] == 0.3
    assert "C=0.3" in repr(probe)
    with pytest.raises(probes.ProbeNotFittedError):
        probe.predict(torch.zeros(2, 3))
    x, y, _ = planted_features(100, 3, seed=9)
    assert probe.fit(x, y) is probe
    with pytest.raises(ValueError):
        probes.LogisticRegressionProbe().fit(x, torch.full((100,), 2))
    with pytest.raises(ValueError):
        probes.MeanDiffProbe().fit(x, torch.zeros(100))  # one class only
    with pytest.raises(IndexError):
        probe.select(0)  # not batched


def test_lda_shrinkage_matches_sklearn_ledoit_wolf() -> None:
    from sklearn.covariance import ledoit_wolf_shrinkage

    from intervene.probes.lda import ledoit_wolf_shrinkage as ours

    x = torch.randn(50, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xc = x - x.mean(0)
    expected = ledoit_wolf_shrinkage(xc.numpy(), assume_centered=True)
    got = ours(xc, xc.T @ xc / 50)
    assert abs(float(got) - expected) < 1e-10
    # More dims than samples still gives a finite, well-posed direction.
    x, y, direction = planted_features(40, 100, margin=6.0, seed=10)
    probe = probes.LDAProbe().fit(x, y)
    assert torch.isfinite(probe.coef_).all() and 0 < float(probe.shrinkage_) <= 1
    assert float(_cos(probe.direction_, direction)) > 0.5
