"""Transfer metrics, PGR (Mallen et al. 2023) and Mahalanobis anomaly detection on probe log-odds."""

from __future__ import annotations

import math

import pytest
import torch

from intervene import probes
from intervene.evaluate.anomaly import MahalanobisDetector, detect_anomalies, probe_log_odds
from intervene.evaluate.transfer import pgr, quirky_pgr, transfer_eval
from intervene.probes.synthetic import planted_features


def test_pgr_formula_by_hand() -> None:
    assert pgr(0.8, 0.6, 0.9) == pytest.approx(2 / 3)
    assert pgr(0.9, 0.6, 0.9) == 1.0 and pgr(0.6, 0.6, 0.9) == 0.0
    assert pgr(0.5, 0.6, 0.9) == pytest.approx(-1 / 3)  # worse than the floor
    assert math.isnan(pgr(0.7, 0.8, 0.8))
    got = pgr(torch.tensor([0.8, 0.7]), torch.tensor([0.6, 0.5]), torch.tensor([0.9, 0.7]))
    torch.testing.assert_close(got, torch.tensor([2 / 3, 1.0], dtype=torch.float64))


def _quirky(
    n: int, *, bob: bool, output_signal: float, seed: int, layers: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations carrying the truth and the model's output; Bob's output is wrong on half the items.

    Returns features ``[layers, n, 6]`` (or ``[n, 6]``), the truth and the context's own labels.
    """
    g = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, 2, (n,), generator=g)
    wrong = torch.randint(0, 2, (n,), generator=g) if bob else torch.zeros(n, dtype=torch.int64)
    said = truth ^ wrong
    x = torch.randn(layers, n, 6, generator=g)
    x[..., 0] += 3.0 * (truth - 0.5)
    x[..., 1] += output_signal * (said - 0.5)
    x[..., 2] += 2.0 * float(bob)  # the context itself is visible
    return (x if layers > 1 else x[0]), truth, said


def test_quirky_pgr_from_probes() -> None:
    xa, ta, _ = _quirky(600, bob=False, output_signal=3.0, seed=1)
    xb, tb, sb = _quirky(600, bob=True, output_signal=3.0, seed=2)
    alice = probes.LogisticRegressionProbe().fit(xa[:300], ta[:300])
    bob = probes.LogisticRegressionProbe().fit(xb[:300], sb[:300])  # Bob's (wrong) labels
    res = quirky_pgr(alice, bob, (xa[300:], ta[300:]), (xb[300:], tb[300:]), n_bootstrap=300)
    ceiling = probes.auroc(ta[300:], alice.decision_function(xa[300:]))
    transfer = probes.auroc(tb[300:], alice.decision_function(xb[300:]))
    floor = probes.auroc(tb[300:], bob.decision_function(xb[300:]))
    assert res["ceiling"].estimate == ceiling and res["floor"].estimate == floor
    assert res["pgr"].estimate == pytest.approx(pgr(transfer, floor, ceiling))
    assert floor < transfer < ceiling  # the Alice probe leans on both truth and output features
    for ci in res.values():
        assert ci.lower <= ci.estimate <= ci.upper


def test_pgr_near_one_when_output_is_not_represented() -> None:
    xa, ta, _ = _quirky(800, bob=False, output_signal=0.0, seed=3, layers=2)
    xb, tb, sb = _quirky(800, bob=True, output_signal=0.0, seed=4, layers=2)
    alice = probes.MeanDiffProbe().fit(xa, ta)
    bob = probes.MeanDiffProbe().fit(xb, sb)
    res = quirky_pgr(alice, bob, (xa, ta), (xb, tb), n_bootstrap=200)
    assert res["pgr"].estimate.shape == (2,)  # per layer
    assert torch.all(res["pgr"].estimate > 0.9)
    assert torch.all(res["floor"].estimate < 0.7)  # Bob's labels are uninformative about the truth


def test_transfer_eval_reports_metrics_with_intervals() -> None:
    x, y, _ = planted_features(400, 6, seed=5)
    probe = probes.LogisticRegressionProbe().fit(x[:200], y[:200])
    res = transfer_eval(probe, x[200:], y[200:], n_bootstrap=200)
    assert set(res) == {"auroc", "accuracy", "calibrated_accuracy", "ece"}
    for ci in res.values():
        assert ci.lower <= ci.estimate <= ci.upper
    assert res["auroc"].estimate > 0.9
    assert res == transfer_eval(probe, x[200:], y[200:], n_bootstrap=200)  # seeded
    xb, yb, _ = planted_features(300, 6, batch=(3,), seed=6)
    batched = probes.MeanDiffProbe().fit(xb, yb)
    res = transfer_eval(batched, xb, yb, metrics=("auroc",), n_bootstrap=100)
    assert res["auroc"].estimate.shape == (3,)


def test_transfer_eval_on_contrast_pairs() -> None:
    from intervene.probes.synthetic import planted_pairs

    xp, xn, y, _ = planted_pairs(300, 6, seed=7)
    probe = probes.CRCProbe().fit(xp, xn).calibrate(xp, xn, y)
    res = transfer_eval(probe, (xp, xn), y, metrics=("auroc", "accuracy"), n_bootstrap=100)
    assert res["auroc"].estimate > 0.95


def _layers(n: int, *, bob: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four layers: early ones encode the truth, late ones what the model says (wrong for Bob)."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, 2, (n,), generator=g)
    said = 1 - truth if bob else truth
    x = torch.randn(4, n, 5, generator=g)
    x[:2, :, 0] += 5.0 * (truth - 0.5)
    x[2:, :, 0] += 5.0 * (said - 0.5)
    return x, truth


def test_anomaly_detection_flags_a_planted_mechanism_shift() -> None:
    x_train, t_train = _layers(400, bob=False, seed=10)
    probe = probes.LogisticRegressionProbe().fit(x_train, t_train)  # one probe per layer
    trusted, _ = _layers(400, bob=False, seed=11)  # held out from probe training
    normal, _ = _layers(300, bob=False, seed=12)
    anomalous, _ = _layers(300, bob=True, seed=13)
    assert probe_log_odds(probe, trusted).shape == (400, 4)
    res = detect_anomalies(probe, trusted, normal, anomalous, n_bootstrap=200)
    assert res.auroc.estimate > 0.95
    assert res.auroc.lower <= res.auroc.estimate <= res.auroc.upper
    assert res.scores.shape == (600,) and int(res.labels.sum()) == 300
    # Same distribution for both test groups: chance level.
    null = detect_anomalies(probe, trusted, normal, _layers(300, bob=False, seed=14)[0], n_bootstrap=100)
    assert abs(null.auroc.estimate - 0.5) < 0.1
    assert detect_anomalies(probe, trusted, normal, anomalous, subtract_diag=True).auroc.estimate > 0.9


def test_mahalanobis_detector_on_gaussians() -> None:
    g = torch.Generator().manual_seed(0)
    cov_root = torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    x = torch.randn(20000, 3, generator=g, dtype=torch.float64) @ cov_root.T + 5
    det = MahalanobisDetector().fit(x)
    torch.testing.assert_close(det.mean_, torch.full((3,), 5.0, dtype=torch.float64), atol=0.05, rtol=0)
    scores = det.score(x)
    assert abs(float(scores.mean()) - 3.0) < 0.1  # chi-squared with 3 degrees of freedom
    # A point off the correlation structure is far even though each coordinate is typical.
    odd = torch.tensor([[5 + 2.0, 5 - 1.5, 5.0]], dtype=torch.float64)
    assert float(det.score(odd)[0]) > 20
    with pytest.raises(ValueError):
        MahalanobisDetector().fit(torch.zeros(1, 3))
