"""Probes on activations: supervised (logistic regression, mean difference, LDA) and unsupervised
(CCS, CRC) linear probes, scikit-learn style, batched over layers and heads; metrics with bootstrap
confidence intervals; Platt calibration; JSON + safetensors persistence.

    import intervene.probes as probes
    probe = probes.LogisticRegressionProbe(C=1.0).fit(x, y)      # x [N, D] or [L, N, D] or [L, H, N, D]
    ccs = probes.CCS(n_restarts=10).fit(x_pos, x_neg).calibrate(x_pos, x_neg, y)
    probe.save("probe_dir"); probes.load_probe("probe_dir")
"""

import intervene.probes.metrics as metrics
from intervene.errors import ProbeFormatError, ProbeNotFittedError, ProbeNotFoundError
from intervene.probes.base import LinearProbe, Probe
from intervene.probes.calibration import PlattCalibration, calibrate, fit_platt
from intervene.probes.ccs import CCSProbe
from intervene.probes.crc import CRCProbe
from intervene.probes.io import load_probe, probe_from_state, probe_to_state, save_probe
from intervene.probes.lda import LDAProbe
from intervene.probes.lr import LogisticRegressionProbe
from intervene.probes.mean_diff import MeanDiffProbe
from intervene.probes.metrics import (
    MetricCI,
    accuracy,
    auroc,
    bootstrap_ci,
    calibrated_accuracy,
    ece,
)
from intervene.probes.registry import lookup_probe, register_probe, registered_probes

# Short aliases (the design's ``iv.probes.CCS()``).
CCS = CCSProbe
CRC = CRCProbe
LDA = LDAProbe
LogisticRegression = LogisticRegressionProbe
MeanDiff = MeanDiffProbe

__all__ = [
    "CCS",
    "CCSProbe",
    "CRC",
    "CRCProbe",
    "LDA",
    "LDAProbe",
    "LinearProbe",
    "LogisticRegression",
    "LogisticRegressionProbe",
    "MeanDiff",
    "MeanDiffProbe",
    "MetricCI",
    "PlattCalibration",
    "Probe",
    "ProbeFormatError",
    "ProbeNotFoundError",
    "ProbeNotFittedError",
    "accuracy",
    "auroc",
    "bootstrap_ci",
    "calibrate",
    "calibrated_accuracy",
    "ece",
    "fit_platt",
    "load_probe",
    "lookup_probe",
    "metrics",
    "probe_from_state",
    "probe_to_state",
    "register_probe",
    "registered_probes",
    "save_probe",
]
