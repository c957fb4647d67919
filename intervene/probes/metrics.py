"""Classification metrics for probes, batched over leading dims, with seeded bootstrap CIs.

Every metric has the signature ``metric(y, p)`` where ``y`` holds binary labels and ``p`` the
probability (or any monotone score, for :func:`auroc`) of the positive class. Both may carry leading
batch dims (``[..., N]``; ``y`` may also be a shared ``[N]``); 1-D inputs give a Python float,
batched inputs a float64 tensor of shape ``[...]``. This is what makes :func:`bootstrap_ci` cheap:
1,000 resamples are one batched call, not a Python loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

Metric = Callable[[torch.Tensor, torch.Tensor], "float | torch.Tensor"]

__all__ = [
    "MetricCI",
    "accuracy",
    "auroc",
    "auroc_resampled",
    "bootstrap_ci",
    "calibrated_accuracy",
    "ece",
    "get_metric",
]


class MetricCI(NamedTuple):
    """A point estimate with a two-sided percentile-bootstrap interval (floats, or tensors ``[...]``)."""

    estimate: float | torch.Tensor
    lower: float | torch.Tensor
    upper: float | torch.Tensor


def _as_tensor(a: object) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach()
    return torch.as_tensor(np.asarray(a))


def _prepare(y: object, p: object) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Labels and scores as float64 CPU tensors broadcast to one shape ``[..., N]``."""
    yt = _as_tensor(y).to("cpu", torch.float64)
    pt = _as_tensor(p).to("cpu", torch.float64)
    if yt.ndim == 0 or pt.ndim == 0:
        raise ValueError("y and p need a sample dimension (shape [..., N])")
    if yt.shape[-1] != pt.shape[-1]:
        raise ValueError(f"y has {yt.shape[-1]} samples but p has {pt.shape[-1]}")
    if not bool(((yt == 0) | (yt == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    scalar = yt.ndim == 1 and pt.ndim == 1
    shape = torch.broadcast_shapes(yt.shape, pt.shape)
    return yt.expand(shape), pt.expand(shape), scalar


def _finish(value: torch.Tensor, scalar: bool) -> float | torch.Tensor:
    return float(value) if scalar else value


def _average_ranks(p: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``p`` along the last dim, ties sharing their average rank (like scipy's)."""
    n = p.shape[-1]
    sorted_p, order = torch.sort(p, dim=-1, stable=True)
    pos = torch.arange(n, dtype=torch.int64).expand(p.shape)
    new_group = torch.ones(p.shape, dtype=torch.bool)
    new_group[..., 1:] = sorted_p[..., 1:] != sorted_p[..., :-1]
    # First index of each tie group: running max of the group-start positions.
    first = torch.cummax(torch.where(new_group, pos, torch.zeros_like(pos)), dim=-1).values
    # Last index: the same scan from the right (on flipped, negated positions).
    ends_group = torch.ones(p.shape, dtype=torch.bool)
    ends_group[..., :-1] = new_group[..., 1:]
    last_rev = torch.cummax(torch.where(ends_group, -pos, torch.full_like(pos, -(n - 1))).flip(-1), dim=-1)
    last = -last_rev.values.flip(-1)
    avg_sorted = (first + last).to(torch.float64) / 2 + 1
    ranks = torch.empty_like(avg_sorted)
    ranks.scatter_(-1, order, avg_sorted)
    return ranks


def auroc(y: object, p: object) -> float | torch.Tensor:
    """Area under the ROC curve, identical to ``sklearn.metrics.roc_auc_score`` (ties count 1/2).

    Computed as the Mann–Whitney U statistic from average ranks, batched over leading dims.

    Args:
        y: labels in {0, 1}, ``[N]`` or ``[..., N]``.
        p: scores (any monotone transform gives the same AUROC), ``[N]`` or ``[..., N]``.

    Returns:
        A float for 1-D inputs, else a float64 tensor ``[...]``. A batch item with only one class
        gives NaN (1-D inputs raise ``ValueError`` instead, like scikit-learn).
    """
    yt, pt, scalar = _prepare(y, p)
    n_pos = yt.sum(-1)
    n_neg = yt.shape[-1] - n_pos
    if scalar and (n_pos == 0 or n_neg == 0):
        raise ValueError("AUROC is undefined when only one class is present in y")
    ranks = _average_ranks(pt)
    u = (ranks * yt).sum(-1) - n_pos * (n_pos + 1) / 2
    value = u / (n_pos * n_neg)
    value = torch.where((n_pos > 0) & (n_neg > 0), value, torch.full_like(value, float("nan")))
    return _finish(value, scalar)


def auroc_resampled(y: object, p: object, idx: torch.Tensor) -> torch.Tensor:
    """AUROC on each resample ``(y[..., idx[r]], p[..., idx[r]])``, without sorting per resample.

    A resample with replacement is a vector of counts over the original samples, and the
    Mann–Whitney statistic is linear in those counts once the scores are sorted (and tie groups
    found) a single time: ``U = sum_groups w_pos * (w_neg below + w_neg tied / 2)``. So 1,000
    bootstrap AUROCs cost a few O(N) passes each instead of a sort each; the values are identical
    to :func:`auroc` on the resampled data.

    Args:
        y: labels ``[N]`` or ``[..., N]``; p: scores ``[N]`` or ``[..., N]``.
        idx: ``[n, N]`` sample indices of ``n`` resamples.

    Returns:
        float64 tensor ``[..., n]`` (NaN where a resample has a single class).
    """
    yt, pt, _ = _prepare(y, p)
    n_res, n = idx.shape
    counts = torch.zeros(n_res, n, dtype=torch.float64).scatter_add_(
        -1, idx, torch.ones(idx.shape, dtype=torch.float64)
    )
    sorted_p, order = torch.sort(pt, dim=-1, stable=True)
    new_group = torch.ones(pt.shape, dtype=torch.int64)
    new_group[..., 1:] = (sorted_p[..., 1:] != sorted_p[..., :-1]).to(torch.int64)
    group_sorted = torch.cumsum(new_group, -1) - 1
    group = torch.empty_like(group_sorted).scatter_(-1, order, group_sorted)  # tie group of each sample
    batch = pt.shape[:-1]
    group = group.unsqueeze(-2).expand(*batch, n_res, n)
    w = counts.expand(*batch, n_res, n)
    yb = yt.unsqueeze(-2)
    w_pos = torch.zeros(*batch, n_res, n, dtype=torch.float64).scatter_add_(-1, group, w * yb)
    w_neg = torch.zeros(*batch, n_res, n, dtype=torch.float64).scatter_add_(-1, group, w * (1 - yb))
    below = torch.cumsum(w_neg, -1) - w_neg
    u = (w_pos * (below + w_neg / 2)).sum(-1)
    n_pos, n_neg = w_pos.sum(-1), w_neg.sum(-1)
    value = u / (n_pos * n_neg)
    return torch.where((n_pos > 0) & (n_neg > 0), value, torch.full_like(value, float("nan")))


def accuracy(y: object, p: object, threshold: float = 0.5) -> float | torch.Tensor:
    """Fraction of samples where ``p > threshold`` equals the label. Shapes as in :func:`auroc`."""
    yt, pt, scalar = _prepare(y, p)
    return _finish(((pt > threshold).to(torch.float64) == yt).to(torch.float64).mean(-1), scalar)


def calibrated_accuracy(y: object, p: object) -> float | torch.Tensor:
    """Accuracy after moving the threshold so the predicted positive rate equals the label prior.

    This is elk's "calibrated accuracy": it ignores the probe's bias (useful for unsupervised
    probes, whose offset is arbitrary) but, unlike AUROC, still rewards one global threshold. We
    predict positive for the ``k = round(mean(y) * N)`` highest scores (the threshold at the
    ``1 - prior`` quantile); ties at the boundary are broken by sample order, deterministically.
    Shapes as in :func:`auroc`.
    """
    yt, pt, scalar = _prepare(y, p)
    n = yt.shape[-1]
    k = torch.round(yt.mean(-1) * n).to(torch.int64)  # [...]
    order = torch.argsort(pt, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n).expand(order.shape).contiguous())
    pred = (rank < k.unsqueeze(-1)).to(torch.float64)
    return _finish((pred == yt).to(torch.float64).mean(-1), scalar)


def ece(y: object, p: object, n_bins: int = 10) -> float | torch.Tensor:
    """Expected calibration error of positive-class probabilities, ``n_bins`` equal-width bins.

    ``ECE = sum_b (n_b / N) * |mean(y in b) - mean(p in b)|`` with bins ``[0, .1), ..., [.9, 1]``.
    This is the reliability-diagram error of ``P(y=1)``, not the "top-label confidence" variant;
    for binary problems the two differ only in how bins fold around 0.5. ``p`` must be in [0, 1].
    """
    yt, pt, scalar = _prepare(y, p)
    if bool(((pt < 0) | (pt > 1)).any()):
        raise ValueError("ece needs probabilities in [0, 1]")
    bins = torch.clamp((pt * n_bins).to(torch.int64), max=n_bins - 1)
    shape = (*pt.shape[:-1], n_bins)
    sum_p = torch.zeros(shape, dtype=torch.float64).scatter_add_(-1, bins, pt)
    sum_y = torch.zeros(shape, dtype=torch.float64).scatter_add_(-1, bins, yt)
    return _finish((sum_y - sum_p).abs().sum(-1) / pt.shape[-1], scalar)


_METRICS: dict[str, Metric] = {
    "auroc": auroc,
    "accuracy": accuracy,
    "calibrated_accuracy": calibrated_accuracy,
    "ece": ece,
}


def get_metric(metric: str | Metric) -> Metric:
    """Resolve a metric name (``auroc``, ``accuracy``, ``calibrated_accuracy``, ``ece``) or pass a callable through."""
    if callable(metric):
        return metric
    try:
        return _METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(_METRICS)}") from None


def bootstrap_ci(
    metric: str | Metric,
    y: object,
    p: object,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    max_elements: int = 2**22,
) -> MetricCI:
    """Point estimate and percentile-bootstrap ``1 - alpha`` interval of ``metric(y, p)``.

    The same ``n`` resamples of the N samples (drawn with a ``torch.Generator`` seeded by ``seed``)
    are applied to every batch item, so per-layer intervals are comparable. The metric must accept
    leading batch dims (all metrics here do); resamples run in chunks of at most ``max_elements``
    values to bound memory. Resamples where the metric is undefined (e.g. one class) are dropped.

    Args:
        metric: a name from :func:`get_metric` or a batched callable ``metric(y, p)``.
        y: labels ``[N]`` or ``[..., N]``; p: scores/probabilities ``[N]`` or ``[..., N]``.
        n: number of bootstrap resamples. seed: RNG seed. alpha: 0.05 gives a 95% interval.

    Returns:
        ``MetricCI(estimate, lower, upper)``: floats for 1-D inputs, else tensors ``[...]``.
    """
    fn = get_metric(metric)
    yt, pt, scalar = _prepare(y, p)
    n_samples = yt.shape[-1]
    estimate = fn(yt, pt)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n_samples, (n, n_samples), generator=gen)
    per_resample = max(1, yt[..., 0].numel() * n_samples)
    chunk = max(1, max_elements // per_resample)
    values = []
    for start in range(0, n, chunk):
        sel = idx[start : start + chunk]  # [c, N]
        if fn is auroc:
            values.append(auroc_resampled(yt, pt, sel))
            continue
        yb = yt[..., sel]  # [..., c, N]
        pb = pt[..., sel]
        values.append(torch.as_tensor(fn(yb, pb), dtype=torch.float64))
    stats = torch.cat(values, dim=-1)  # [..., n]
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)
    bounds = torch.nanquantile(stats, q, dim=-1)  # [2, ...]
    lower, upper = bounds[0], bounds[1]
    if scalar:
        return MetricCI(float(estimate), float(lower), float(upper))
    return MetricCI(torch.as_tensor(estimate, dtype=torch.float64), lower, upper)
