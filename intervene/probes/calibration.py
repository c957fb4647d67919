"""Platt calibration: a 1-D logistic regression on a probe's scores.

Unsupervised probes (CCS, CRC) learn a direction whose sign and scale are arbitrary; Platt scaling
on a few labelled examples fixes both. For supervised probes it re-fits offset and temperature
(e.g. on a validation set). The probe classes call :func:`fit_platt` from ``probe.calibrate``;
:func:`calibrate` is the functional spelling, and :class:`PlattCalibration` a standalone
calibrator for raw score arrays.
"""

from __future__ import annotations

from typing import TypeVar

import torch

from intervene.errors import ProbeNotFittedError
from intervene.probes.arrays import ArrayLike, to_tensor
from intervene.probes.solvers.newton import fit_logistic_1d

P = TypeVar("P")  # a Probe (not imported: the probe base class imports this module)

__all__ = ["PlattCalibration", "calibrate", "fit_platt"]


def fit_platt(
    scores: ArrayLike, y: ArrayLike, max_iter: int = 50, l2: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``P(y=1) = sigmoid(scale * s + bias)`` per batch item.

    Args:
        scores: ``[N]`` or ``[*batch, N]`` raw scores (any real values).
        y: labels in {0, 1}, ``[N]`` or ``[*batch, N]``.
        l2: a tiny penalty on ``scale`` so that perfectly separable scores give a finite (large)
            scale instead of diverging.

    Returns:
        ``(scale, bias)``, float64 tensors of shape ``[*batch]``. A negative scale means the
        scores were anti-correlated with the labels.
    """
    s = to_tensor(scores).double().cpu()
    yt = to_tensor(y).double().cpu()
    if s.shape[-1] != yt.shape[-1]:
        raise ValueError(f"scores have {s.shape[-1]} samples but y has {yt.shape[-1]}")
    batch = torch.broadcast_shapes(s.shape[:-1], yt.shape[:-1])
    s = s.expand(*batch, s.shape[-1]).reshape(-1, s.shape[-1])
    yt = yt.expand(*batch, yt.shape[-1]).reshape(-1, yt.shape[-1])
    res = fit_logistic_1d(s, yt, l2=l2, max_iter=max_iter)
    return res.coef[:, 0].reshape(batch), res.intercept.reshape(batch)


def calibrate(probe: P, *args: ArrayLike) -> P:
    """Platt-calibrate ``probe`` in place and return it: ``calibrate(probe, x, y)`` or
    ``calibrate(probe, x_pos, x_neg, y)``. Fixes the sign of ``probe.direction_`` (positive means
    label 1) and the scale of its log-odds."""
    return probe.calibrate(*args)  # type: ignore[attr-defined]


class PlattCalibration:
    """Standalone Platt scaler for score arrays (scikit-learn style).

    ``PlattCalibration().fit(scores, y)`` learns ``scale_`` and ``bias_`` (``[*batch]``);
    ``predict_proba(scores)`` returns ``sigmoid(scale_ * scores + bias_)``.
    """

    def __init__(self, max_iter: int = 50, l2: float = 1e-6) -> None:
        self.max_iter = max_iter
        self.l2 = l2

    def fit(self, scores: ArrayLike, y: ArrayLike) -> PlattCalibration:
        self.scale_, self.bias_ = fit_platt(scores, y, max_iter=self.max_iter, l2=self.l2)
        return self

    def decision_function(self, scores: ArrayLike) -> torch.Tensor:
        """Calibrated log-odds, same shape as ``scores``."""
        if not hasattr(self, "scale_"):
            raise ProbeNotFittedError("PlattCalibration is not fitted yet; call fit() first")
        s = to_tensor(scores).double().cpu()
        return self.scale_.unsqueeze(-1) * s + self.bias_.unsqueeze(-1)

    def predict_proba(self, scores: ArrayLike) -> torch.Tensor:
        return torch.sigmoid(self.decision_function(scores))
