"""Mechanistic anomaly detection from probe outputs (Mallen et al. 2023, section "anomaly detection").

Setup of the paper: a probe is trained at every layer on trusted data (Alice's contexts, easy
questions). Each example is summarised by the vector of its per-layer probe log-odds. A Gaussian
(mean and covariance) is fitted to those vectors on trusted examples; a test example's anomaly
score is its Mahalanobis distance from it. The detector is evaluated by the AUROC of telling
Bob's (untruthful) examples from Alice's on hard questions — examples it never saw — since the
model's *mechanism* for answering differs even where the answers look alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from intervene.probes.base import ArrayLike, Probe
from intervene.probes.metrics import MetricCI, bootstrap_ci

__all__ = ["AnomalyResult", "MahalanobisDetector", "detect_anomalies", "probe_log_odds"]


def probe_log_odds(probe: Probe, *xs: ArrayLike) -> torch.Tensor:
    """Per-example feature vectors ``[N, F]``: the probe's log-odds for every batch item.

    A probe fitted on ``[L, N, D]`` gives ``F = L`` (one log-odds per layer); ``[L, H, N, D]``
    gives ``F = L * H``; a single probe ``F = 1``. ``xs`` is ``x`` or ``(x_pos, x_neg)``.
    """
    scores = probe.decision_function(*xs).detach().double().cpu()  # [*batch, N]
    return scores.reshape(-1, scores.shape[-1]).T.contiguous()


class MahalanobisDetector:
    """Gaussian anomaly detector: score = squared Mahalanobis distance to the trusted data.

    Args:
        ridge: added to the covariance diagonal, relative to its mean variance (keeps the
            inverse finite when layers' log-odds are nearly collinear).
        subtract_diag: subtract the distance under the diagonal covariance (a trick used in
            elk-generalization's detector, after Anthropic's work) — scores only the correlation
            structure.

    Learned attributes: ``mean_`` [F], ``covariance_`` [F, F], ``precision_`` [F, F].
    """

    def __init__(self, ridge: float = 1e-6, subtract_diag: bool = False) -> None:
        self.ridge = ridge
        self.subtract_diag = subtract_diag

    def fit(self, features: ArrayLike) -> MahalanobisDetector:
        """Fit on trusted examples' features ``[N, F]`` (N > 1)."""
        x = torch.as_tensor(features, dtype=torch.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError("features must be [N, F] with N >= 2")
        self.mean_ = x.mean(0)
        xc = x - self.mean_
        cov = xc.T @ xc / (x.shape[0] - 1)
        jitter = self.ridge * cov.diagonal().mean().clamp_min(1e-12)
        self.covariance_ = cov + jitter * torch.eye(cov.shape[0], dtype=torch.float64)
        self.precision_ = torch.cholesky_inverse(torch.linalg.cholesky(self.covariance_))
        return self

    def score(self, features: ArrayLike) -> torch.Tensor:
        """Anomaly scores ``[M]`` for features ``[M, F]``: higher means more anomalous."""
        if not hasattr(self, "mean_"):
            raise AttributeError("MahalanobisDetector is not fitted yet; call fit() first")
        x = torch.as_tensor(features, dtype=torch.float64) - self.mean_
        dist = ((x @ self.precision_) * x).sum(-1)
        if self.subtract_diag:
            dist = dist - (x * x / self.covariance_.diagonal()).sum(-1)
        return dist


@dataclass
class AnomalyResult:
    """Outcome of :func:`detect_anomalies`."""

    auroc: MetricCI  # AUROC of anomalous (1) vs normal (0) test examples, with a bootstrap CI
    scores: torch.Tensor  # [M_normal + M_anomalous] anomaly scores, normal examples first
    labels: torch.Tensor  # [M_normal + M_anomalous] 0 = normal, 1 = anomalous
    detector: MahalanobisDetector


def _xs(x: ArrayLike | tuple[ArrayLike, ArrayLike]) -> tuple[ArrayLike, ...]:
    return x if isinstance(x, tuple) else (x,)


def detect_anomalies(
    probe: Probe,
    trusted: ArrayLike | tuple[ArrayLike, ArrayLike],
    normal_test: ArrayLike | tuple[ArrayLike, ArrayLike],
    anomalous_test: ArrayLike | tuple[ArrayLike, ArrayLike],
    *,
    subtract_diag: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> AnomalyResult:
    """Fit a Mahalanobis detector on ``probe``'s per-layer log-odds of trusted examples and score tests.

    Args:
        probe: fitted on trusted data, usually batched over layers (``[L, N, D]`` features).
        trusted: features of trusted examples (e.g. Alice, easy) *not* used to train the probe.
        normal_test: features of held-out normal examples (e.g. Alice, hard).
        anomalous_test: features of examples to flag (e.g. Bob, hard).
        Features are ``[*batch, N, D]`` as the probe expects, or ``(x_pos, x_neg)`` pairs.

    Returns:
        :class:`AnomalyResult` with the AUROC of separating anomalous from normal test examples.
    """
    detector = MahalanobisDetector(subtract_diag=subtract_diag).fit(probe_log_odds(probe, *_xs(trusted)))
    s_normal = detector.score(probe_log_odds(probe, *_xs(normal_test)))
    s_anomalous = detector.score(probe_log_odds(probe, *_xs(anomalous_test)))
    scores = torch.cat([s_normal, s_anomalous])
    labels = torch.cat([torch.zeros(s_normal.shape[0]), torch.ones(s_anomalous.shape[0])]).to(torch.int64)
    ci = bootstrap_ci("auroc", labels, scores, n=n_bootstrap, seed=seed, alpha=alpha)
    return AnomalyResult(auroc=ci, scores=scores, labels=labels, detector=detector)
