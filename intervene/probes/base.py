"""The probe base classes: hyperparameters, input conversion, batching, slicing, Platt calibration.

Conventions (scikit-learn's): ``__init__`` only stores hyperparameters; ``fit`` returns ``self``;
learned attributes end in ``_``. Every probe may be fitted on a batch of independent problems at
once: features ``[*batch, N, D]`` give learned tensors with the leading ``batch`` dims
(``direction_`` is ``[*batch, D]``) and predictions ``[*batch, N]``. ``probe[i]`` (or
``probe.select(i)``) slices one (or a sub-batch of) probes out.

Shape names used in docstrings: ``N`` samples, ``D`` features, ``*batch`` any leading dims
(e.g. ``[L]`` layers or ``[L, H]`` heads).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

import intervene.probes.metrics as metrics
from intervene.errors import ProbeFormatError, ProbeNotFittedError
from intervene.probes.arrays import ArrayLike

P = TypeVar("P", bound="Probe")


def as_features(x: ArrayLike, name: str = "x") -> torch.Tensor:
    """Features as a floating tensor ``[..., N, D]`` (half precision is upcast to float32 for fitting)."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim < 2:
        raise ValueError(f"{name} must have shape [..., N, D], got {tuple(t.shape)}")
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    return t


def as_labels(y: ArrayLike, like: torch.Tensor, name: str = "y") -> torch.Tensor:
    """Binary labels as a tensor of ``like``'s dtype/device, shape ``[N]`` or ``[..., N]``."""
    t = y.detach() if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    if t.ndim < 1:
        raise ValueError(f"{name} must have shape [N] or [..., N]")
    t = t.to(like.device, like.dtype)
    if not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(f"{name} must contain only 0 and 1")
    if t.shape[-1] != like.shape[-2]:
        raise ValueError(f"{name} has {t.shape[-1]} samples but the features have {like.shape[-2]}")
    return t


def check_pair(x_pos: ArrayLike, x_neg: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrast-pair features with equal shapes ``[..., N, D]`` and a common dtype."""
    a, b = as_features(x_pos, "x_pos"), as_features(x_neg, "x_neg")
    if a.shape != b.shape:
        raise ValueError(f"x_pos {tuple(a.shape)} and x_neg {tuple(b.shape)} must have the same shape")
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


class Probe:
    """Base class of every probe. Subclasses set ``_tensor_attrs`` and implement ``fit`` and
    :meth:`decision_function`.

    Class attributes:
        probe_type: the registry name (set by :func:`register_probe`).
        n_inputs: 1 for ``f(x)`` probes, 2 for contrast-pair probes ``f(x_pos, x_neg)``.
        _tensor_attrs: learned tensor name -> number of trailing non-batch dims (``coef_``: 1).
        _meta_attrs: learned JSON-able attributes saved with the probe (``n_iter_``...).
    """

    probe_type: ClassVar[str] = "probe"
    n_inputs: ClassVar[int] = 1
    _tensor_attrs: ClassVar[dict[str, int]] = {}
    _meta_attrs: ClassVar[tuple[str, ...]] = ()

    # ---- hyperparameters (scikit-learn protocol) -------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [n for n, p in sig.parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, as stored on the instance."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self: P, **params: Any) -> P:
        valid = set(self._param_names())
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"{type(self).__name__} has no hyperparameter {key!r}")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        batch = f" batch_shape={tuple(self.batch_shape_)}" if self.is_fitted and self.batch_shape_ else ""
        return f"{type(self).__name__}({args}){batch}"

    # ---- fitted state ------------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return bool(self._tensor_attrs) and all(hasattr(self, a) for a in self._tensor_attrs)

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise ProbeNotFittedError(f"this {type(self).__name__} is not fitted yet; call fit() first")

    @property
    def batch_shape_(self) -> torch.Size:
        """The leading batch dims of the learned tensors (``()`` for a single probe)."""
        self._check_fitted()
        name, core = next(iter(self._tensor_attrs.items()))
        t: torch.Tensor = getattr(self, name)
        return t.shape[: t.ndim - core]

    def _learned_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {name: getattr(self, name) for name in self._tensor_attrs}

    def _learned_meta(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._meta_attrs if hasattr(self, name)}

    def _set_learned(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for name, value in tensors.items():
            setattr(self, name, value)
        for name, value in meta.items():
            setattr(self, name, value)

    def select(self: P, index: int | slice | tuple[int | slice, ...] | torch.Tensor) -> P:
        """A new probe holding the learned tensors indexed along the batch dims only.

        ``probe.select(3)`` on a probe fitted on ``[L, N, D]`` gives layer 3's probe (no batch
        dims); ``probe.select((3, 5))`` on ``[L, H, N, D]`` gives head 5 of layer 3.
        """
        self._check_fitted()
        idx = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis or i is None for i in idx):
            raise IndexError("probe indexing supports ints, slices and index tensors, not ... or None")
        if len(idx) > len(self.batch_shape_):
            raise IndexError(f"too many indices for a probe with batch shape {tuple(self.batch_shape_)}")
        new = type(self)(**self.get_params())
        tensors = {name: t[idx].clone() for name, t in self._learned_tensors().items()}
        new._set_learned(tensors, dict(self._learned_meta()))
        return new

    def __getitem__(self: P, index: int | slice | tuple[int | slice, ...] | torch.Tensor) -> P:
        return self.select(index)

    # ---- prediction --------------------------------------------------------------------------------
    def decision_function(self, *xs: ArrayLike) -> torch.Tensor:
        """Log-odds of the positive class, ``[*batch, N]`` (features ``[N, D]`` or ``[*batch, N, D]``)."""
        raise NotImplementedError

    def predict_proba(self, *xs: ArrayLike) -> torch.Tensor:
        """Probability of the positive class, ``[*batch, N]``."""
        return torch.sigmoid(self.decision_function(*xs))

    def predict(self, *xs: ArrayLike) -> torch.Tensor:
        """Hard labels (int64 0/1), ``[*batch, N]``."""
        return (self.decision_function(*xs) > 0).to(torch.int64)

    def score(self, *args: ArrayLike) -> float | torch.Tensor:
        """Accuracy: ``score(x, y)`` (or ``score(x_pos, x_neg, y)``); a float, or ``[*batch]``."""
        *xs, y = args
        if len(xs) != self.n_inputs:
            raise TypeError(f"{type(self).__name__}.score takes {self.n_inputs} feature argument(s) and y")
        return metrics.accuracy(y, self.predict_proba(*xs))

    # ---- calibration -------------------------------------------------------------------------------
    def calibrate(self: P, *args: ArrayLike, max_iter: int = 50) -> P:
        """Platt-scale the scores on labelled data: fit ``sigmoid(a * s + b)`` to ``y``, per batch item.

        Fixes the sign (a negative ``a`` flips ``direction_`` so that positive means label 1) and
        the scale of unsupervised probes; for supervised probes it re-fits the offset and
        temperature. Call as ``calibrate(x, y)`` or ``calibrate(x_pos, x_neg, y)``.
        """
        from intervene.probes.calibration import fit_platt

        *xs, y = args
        if len(xs) != self.n_inputs:
            raise TypeError(
                f"{type(self).__name__}.calibrate takes {self.n_inputs} feature argument(s) and y"
            )
        scores = self.decision_function(*xs)
        scale, bias = fit_platt(scores, y, max_iter=max_iter)
        self._apply_platt(scale, bias)
        return self

    def _apply_platt(self, scale: torch.Tensor, bias: torch.Tensor) -> None:
        """Replace the decision function ``s`` by ``scale * s + bias`` (``scale``/``bias``: ``[*batch]``)."""
        raise NotImplementedError

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the probe as JSON (type, hyperparameters, metadata) + safetensors; see :mod:`.io`."""
        from intervene.probes.io import save_probe

        return save_probe(self, path)

    @classmethod
    def load(cls: type[P], path: str | Path) -> P:
        """Load a probe saved by :meth:`save`; raises if the file holds another probe type."""
        from intervene.probes.io import load_probe

        probe = load_probe(path)
        if not isinstance(probe, cls):
            raise ProbeFormatError(f"{path} holds a {type(probe).__name__}, not a {cls.__name__}")
        return probe


class LinearProbe(Probe):
    """A probe whose log-odds are ``features(x) @ coef_ + intercept_``.

    Learned attributes: ``coef_`` ``[*batch, D]`` (in the original activation space),
    ``intercept_`` ``[*batch]``; ``direction_`` is ``coef_`` normalised to unit length.
    Subclasses fill ``coef_``/``intercept_`` in ``fit``; contrast-pair probes override
    :meth:`_features` (e.g. ``x_pos - x_neg``).
    """

    _tensor_attrs: ClassVar[dict[str, int]] = {"coef_": 1, "intercept_": 0}

    @property
    def direction_(self) -> torch.Tensor:
        """Unit-norm ``coef_``, ``[*batch, D]``: positive projections mean label 1 (once calibrated)."""
        self._check_fitted()
        return self.coef_ / self.coef_.norm(dim=-1, keepdim=True).clamp_min(
            torch.finfo(self.coef_.dtype).tiny
        )

    def _features(self, *xs: ArrayLike) -> torch.Tensor:
        if len(xs) != 1:
            raise TypeError(f"{type(self).__name__} takes one feature tensor x [..., N, D]")
        return as_features(xs[0])

    def decision_function(self, *xs: ArrayLike) -> torch.Tensor:
        self._check_fitted()
        x = self._features(*xs)
        coef = self.coef_.to(x.device)
        if x.shape[-1] != coef.shape[-1]:
            raise ValueError(f"features have {x.shape[-1]} dims but the probe expects {coef.shape[-1]}")
        x = x.to(torch.promote_types(x.dtype, coef.dtype))
        out = (x @ coef.to(x.dtype).unsqueeze(-1)).squeeze(-1)
        return out + self.intercept_.to(out.device, out.dtype).unsqueeze(-1)

    def _apply_platt(self, scale: torch.Tensor, bias: torch.Tensor) -> None:
        scale = scale.to(self.coef_.device, self.coef_.dtype)
        bias = bias.to(self.coef_.device, self.coef_.dtype)
        self.coef_ = self.coef_ * scale.unsqueeze(-1)
        self.intercept_ = self.intercept_ * scale + bias
