"""Metrics: AUROC identical to scikit-learn (ties included), batching, ECE, bootstrap intervals."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from intervene.probes import metrics
from intervene.probes.metrics import accuracy, auroc, bootstrap_ci, calibrated_accuracy, ece


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    for scores in (rng.normal(size=n), rng.integers(0, 4, n).astype(float), np.round(rng.normal(size=n), 1)):
        assert abs(auroc(y, scores) - roc_auc_score(y, scores)) < 1e-12
    assert auroc(y, np.zeros(n)) == 0.5  # all tied


def test_auroc_batched_and_degenerate() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (3, 4, 50))
    p = rng.integers(0, 6, (3, 4, 50)).astype(float)
    got = auroc(y, p)
    assert isinstance(got, torch.Tensor) and got.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert abs(float(got[i, j]) - roc_auc_score(y[i, j], p[i, j])) < 1e-12
    shared = auroc(y[0, 0], p[0])  # [N] labels broadcast against [4, N] scores
    assert torch.allclose(
        shared, torch.tensor([roc_auc_score(y[0, 0], p[0, j]) for j in range(4)], dtype=torch.float64)
    )
    with pytest.raises(ValueError):
        auroc(np.ones(10), np.arange(10))
    assert torch.isnan(auroc(np.ones((2, 10)), np.ones((2, 10)))).all()
    assert auroc([0, 0, 1, 1], torch.tensor([0.1, 0.2, 0.3, 0.4])) == 1.0


def test_accuracy_calibrated_accuracy_ece_by_hand() -> None:
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.1, 0.6, 0.7, 0.4, 0.9])
    assert accuracy(y, p) == pytest.approx(3 / 5)
    # Prior 3/5 -> predict the 3 highest scores (0.9, 0.7, 0.6) positive.
    assert calibrated_accuracy(y, p) == pytest.approx(3 / 5)
    # Biased but well-ranked scores: plain accuracy suffers, calibrated accuracy does not.
    q = np.array([0.01, 0.02, 0.1, 0.2, 0.3])
    assert accuracy(y, q) == pytest.approx(2 / 5) and calibrated_accuracy(y, q) == 1.0
    # Bins: [0.1] -> |0 - 0.1|, [0.4] -> |1 - 0.4|, [0.6] -> |0 - 0.6|, [0.7] -> |1 - 0.7|, [0.9] -> |1 - 0.9|.
    assert ece(y, p) == pytest.approx((0.1 + 0.6 + 0.6 + 0.3 + 0.1) / 5)
    assert ece([0, 1], [0.0, 1.0]) == 0.0
    with pytest.raises(ValueError):
        ece(y, p + 1)


def test_ece_matches_a_loop() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(size=(2, 500))
    y = (rng.uniform(size=(2, 500)) < p**2).astype(int)
    got = ece(y, p)
    for b in range(2):
        bins = np.minimum((p[b] * 10).astype(int), 9)
        ref = sum(
            (bins == k).sum() / 500 * abs(y[b][bins == k].mean() - p[b][bins == k].mean())
            for k in range(10)
            if (bins == k).any()
        )
        assert abs(float(got[b]) - ref) < 1e-12


def test_bootstrap_ci_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.uniform(size=300) * 0.7, 0, 1)
    est, lo, hi = bootstrap_ci("auroc", y, p, n=1000, seed=0)
    assert est == auroc(y, p)
    assert lo <= est <= hi and hi - lo > 0.01
    assert bootstrap_ci("auroc", y, p, n=1000, seed=0) == (est, lo, hi)
    assert bootstrap_ci("auroc", y, p, n=1000, seed=1) != (est, lo, hi)
    narrow = bootstrap_ci("auroc", y, p, alpha=0.5)
    assert lo <= narrow.lower <= narrow.upper <= hi
    for name in ("accuracy", "calibrated_accuracy", "ece"):
        e, lo_, hi_ = bootstrap_ci(name, y, p, n=200, seed=0)
        assert lo_ <= e <= hi_
    # A custom batched metric, and batched inputs: per-row intervals equal the 1-D ones.
    mean_p = bootstrap_ci(lambda yy, pp: pp.mean(-1), y, p, n=200)
    assert mean_p.lower <= mean_p.estimate <= mean_p.upper
    pb = np.stack([p, 1 - p])
    batched = bootstrap_ci(metrics.auroc, y, pb, n=300, seed=4)
    for row in range(2):
        single = bootstrap_ci(metrics.auroc, y, pb[row], n=300, seed=4)
        assert abs(float(batched.lower[row]) - single.lower) < 1e-12
        assert abs(float(batched.upper[row]) - single.upper) < 1e-12


def test_bootstrap_is_vectorised_and_fast() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 2000)
    p = rng.uniform(size=2000)
    start = time.perf_counter()
    bootstrap_ci("auroc", y, p, n=1000)
    assert time.perf_counter() - start < 5.0  # ~0.3 s on one core; a Python loop over sklearn is ~1 s+
    with pytest.raises(ValueError):
        metrics.get_metric("f1")
