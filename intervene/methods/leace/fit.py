"""Fitting ConceptErasure: labels to concept indicators, activations to one ``LeaceEraser`` per site.

The math is ``concept-erasure``'s (``LeaceFitter``, Belrose et al. 2023): for features ``x`` ``[N, D]``
and concept indicators ``z`` ``[N, k]``, whiten with ``W = Σ_xx^{-1/2}``, take the column space ``U`` of
``W Σ_xz`` and erase it: ``P = I - W⁺ U Uᵀ W``, stored as ``L = W⁺ U`` ``[D, k]`` and ``R = Uᵀ W``
``[k, D]``. Afterwards no linear classifier predicts ``z`` from the erased features better than a
constant, and among all such affine edits this one moves ``x`` the least (in mean squared distance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from concept_erasure import LeaceEraser, LeaceFitter

from intervene.errors import InterventionError
from intervene.hparams import as_dict, make_config
from intervene.methods.leace.config import ConceptErasureConfig


def indicators(labels: Sequence[Any] | torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
    """Concept indicators ``z`` for LEACE and the class of each column.

    ``labels`` ``[N]`` of ints, bools or strings become one-hot ``[N, k]`` over the ``k`` distinct values
    (sorted), as elk builds them; a float tensor ``[N]`` or ``[N, k]`` (a continuous concept) is used
    as it is, with ``classes`` empty.
    """
    if isinstance(labels, torch.Tensor) and labels.is_floating_point():
        z = labels.detach().double()
        return (z[:, None] if z.ndim == 1 else z), []
    values = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    classes = sorted(set(values), key=lambda v: (str(type(v)), v))
    index = {c: j for j, c in enumerate(classes)}
    z = torch.zeros(len(values), len(classes), dtype=torch.float64)
    z[torch.arange(len(values)), torch.tensor([index[v] for v in values], dtype=torch.long)] = 1.0
    return z, classes


def fit_eraser(x: torch.Tensor, z: torch.Tensor, config: ConceptErasureConfig | None = None) -> LeaceEraser:
    """One ``LeaceEraser`` for features ``x`` ``[N, *shape]`` (flattened to ``[N, D]``) and indicators ``z``
    ``[N, k]``, fitted in ``config.fit_dtype`` with ``config``'s ``LeaceFitter`` options."""
    cfg = config or ConceptErasureConfig()
    dtype = getattr(torch, cfg.fit_dtype)
    x = x.reshape(x.shape[0], -1).to(dtype)
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"{x.shape[0]} activations but {z.shape[0]} labels")
    if x.shape[0] < 2:
        raise ValueError("LEACE needs at least two examples")
    return LeaceFitter.fit(x, z.to(dtype), method=cfg.method, affine=cfg.affine,
                           constrain_cov_trace=cfg.constrain_cov_trace, shrinkage=cfg.shrinkage,
                           svd_tol=cfg.svd_tol).eraser


def _per_token(z: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each example's indicator row repeated for each of its tokens: ``[N, k]`` -> ``[T, k]``."""
    return z.repeat_interleave(offsets.diff(), dim=0)


def fit_erasers(model: Any, tok: Any, data: Any, sites: str | Sequence[str],
                config: ConceptErasureConfig | None = None, *, labels: Any = None, label_field: str = "label",
                activations: Mapping[str, torch.Tensor] | None = None, batch_size: int = 16,
                progress: bool = False, **hyperparameters: Any
                ) -> tuple[dict[str, LeaceEraser], ConceptErasureConfig, dict[str, Any]]:
    """One ``LeaceEraser`` per concrete site erasing ``labels``, the config used, and what the fit records.

    Args:
        model, tok: the model and its tokenizer (unused when ``activations`` are given).
        data: rows (mappings with ``"text"``, e.g. quirky rows) or plain texts.
        sites: names or wildcards (``"layers.2"``, ``"layers.*.heads"``); one eraser per concrete site.
        labels: the concept per row (ints, bools, strings: one-hot; floats: used as they are); default
            ``row[label_field]`` of each row (``label_field="character"`` erases the quirky speaker).
        activations: already collected ``{site: [N, ...]}`` (e.g. :func:`intervene.collect`'s result),
            to skip running the model; flat ``[T, ...]`` per-token activations need an ``offsets`` attribute.
        config / hyperparameters: :class:`ConceptErasureConfig` and overrides of its fields.
    """
    cfg = make_config(ConceptErasureConfig, config, **hyperparameters)
    from_rows = labels is None
    if from_rows:
        rows = list(data) if data is not None else []
        if not rows or not all(isinstance(r, Mapping) and label_field in r for r in rows):
            raise ValueError(f"pass labels=..., or rows that all have a {label_field!r} field")
        labels = [r[label_field] for r in rows]
    z, classes = indicators(labels)
    if activations is None:
        from intervene.activations import collect

        activations = collect(model, tok, data, sites=sites, positions=cfg.collect_positions,
                              batch_size=batch_size, progress=progress)
    names = list(getattr(activations, "sites", None) or activations)
    if sites is not None:
        from intervene.sites import wildcard_match

        pats = [sites] if isinstance(sites, str) else list(sites)
        names = [s for s in names if any(s == p or wildcard_match(p, s) for p in pats)]
    if not names:
        raise InterventionError(f"no activations for sites {sites!r}")
    offsets = getattr(activations, "offsets", None)
    zz = _per_token(z, offsets) if offsets is not None else z
    erasers = {s: fit_eraser(activations[s], zz, cfg) for s in names}
    info = {**as_dict(cfg), "n_examples": int(z.shape[0]), "n_rows_fitted": int(zz.shape[0]),
            "classes": [c if isinstance(c, (int, str, bool)) else str(c) for c in classes],
            "label_field": label_field if from_rows else None,
            "rank": {s: int(torch.count_nonzero(e.proj_left.norm(dim=0))) for s, e in erasers.items()}}
    return erasers, cfg, info
