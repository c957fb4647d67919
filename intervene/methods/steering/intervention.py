"""Additive steering vectors and directional ablation.

``Steering`` adds ``scale * v_site`` at each of its sites; ``DirectionalAblation`` removes the
component along a unit direction ``r`` (``h - (h·r) r``) and optionally adds back a fixed value
along it (``+ value * r``), as in refusal-direction ablation / activation clamping.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from intervene.errors import InterventionError
from intervene.intervention import Intervention
from intervene.positions import CallContext, Positions, PositionsSpec, at_positions
from intervene.schemas.base import Strict, validate
from intervene.sites import Site, wildcard_match
from intervene.tensorfile import check_tensor

# Directions are saved unit-norm in float32; a 16-bit copy is unit within its own rounding.
UNIT_TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2}
UNIT_TOL_DEFAULT = 1e-4


class SteeringParams(Strict):
    """``params`` of a saved ``steering`` intervention."""

    scale: float = 1.0


class AblationParams(Strict):
    """``params`` of a saved ``directional_ablation``: the value added back along the direction, or null."""

    value: float | None = None


def _check_vector(what: str, site: str, v: object, name: str = "vector") -> torch.Tensor:
    """A real floating vector with finite values (the same checks for constructors and ``from_saved``)."""
    return check_tensor(v, InterventionError, what, f"the {name} for {site!r}")


def _as_site_dict(vectors: Mapping[str, torch.Tensor] | torch.Tensor, sites: str | list[str] | None,
                  what: str) -> dict[str, torch.Tensor]:
    if isinstance(vectors, torch.Tensor):
        if sites is None:
            raise InterventionError(f"{what}: pass sites=... with a single vector, or a dict {{site: vector}}")
        sites = [sites] if isinstance(sites, str) else list(sites)
        out = {s: vectors for s in sites}
    elif sites is not None:
        raise InterventionError(f"{what}: sites=... is only for a single vector; the dict already names them")
    else:
        out = dict(vectors)
    for s, v in out.items():
        _check_vector(what, s, v)
    return out


def _direction_of(probe: Any, index: int | None) -> torch.Tensor:
    d = getattr(probe, "direction_", None)
    if d is None:
        raise InterventionError(f"{type(probe).__name__} has no fitted direction_ (fit it first)")
    d = torch.as_tensor(d)
    if d.ndim > 1:
        if index is None:
            raise InterventionError(f"the probe holds {tuple(d.shape[:-1])} directions; pass index=...")
        d = d.reshape(-1, d.shape[-1])[index]
    return d.float()


class _PerSite(Intervention):
    """Shared plumbing: one tensor per site pattern, matched to concrete sites at bind time."""

    tensor_prefix = "vector"

    def __init__(self, vectors: dict[str, torch.Tensor], positions: PositionsSpec, name: str | None) -> None:
        super().__init__(list(vectors), positions, name)
        self.vectors = {s: v.detach() for s, v in vectors.items()}
        self._key_of: dict[str, str] = {}
        self._shape_of: dict[str, tuple[int, ...]] = {}

    def _pattern_for(self, concrete: str) -> str:
        if concrete in self.vectors:
            return concrete
        for pat in self.vectors:
            if wildcard_match(pat, concrete):
                return pat
        raise InterventionError(f"{self.name}: no vector for site {concrete!r}")

    def bind(self, sites: Mapping[str, Site]) -> None:
        for concrete, site in sites.items():
            pat = self._pattern_for(concrete)
            v = self.vectors[pat]
            shape = site.shape
            # The site's own shape, or flat (a head site's [n_heads * head_dim]); anything else, e.g. a
            # [1, hidden] vector with a batch dimension left on, is a mistake that must not broadcast.
            if shape is not None and tuple(v.shape) != tuple(shape) and not (
                    v.ndim == 1 and v.numel() == int(torch.Size(shape).numel())):
                hint = ("; drop the leading dimension (v.squeeze(0) or v[0])" if v.ndim > 1 and v.shape[0] == 1
                        and tuple(v.shape[1:]) in (tuple(shape), (int(torch.Size(shape).numel()),)) else "")
                raise InterventionError(f"{self.name}: the vector for {concrete!r} has shape {tuple(v.shape)}, "
                                        f"the site's activation is {tuple(shape)}{hint}")
            self._key_of[concrete] = pat
            self._shape_of[concrete] = tuple(shape) if shape is not None else tuple(v.shape)
        self.invalidate()

    def _vec(self, site: str, like: torch.Tensor) -> torch.Tensor:
        key = self._key_of.get(site) or self._pattern_for(site)
        ck = (site, like.device, like.dtype)
        out = self._cast_cache.get(ck)
        if out is None:
            v = self._prepare(self.vectors[key]).reshape(self._shape_of.get(site, self.vectors[key].shape))
            out = v.to(device=like.device, dtype=like.dtype)
            self._cast_cache[ck] = out
        return out

    def _prepare(self, v: torch.Tensor) -> torch.Tensor:
        return v

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{self.tensor_prefix}:{s}": v for s, v in self.vectors.items()}

    def expected_shapes(self, sites: Mapping[str, Site]) -> dict[str, tuple[int, ...]]:
        return {}  # checked in bind (flat and per-head shapes are both accepted)

    @staticmethod
    def _vectors_from(tensors: Mapping[str, torch.Tensor], prefix: str, sites: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for s in sites:
            key = f"{prefix}:{s}"
            if key not in tensors:
                raise InterventionError(f"missing tensor {key!r}")
            out[s] = tensors[key]
        return out


class Steering(_PerSite):
    """Add ``scale * v`` at each site: ``Steering({"layers.6": v}, scale=4.0)``.

    Args:
        vectors: ``{site: v}`` with ``v`` of shape ``[width]`` (``[n_heads, head_dim]`` or flat for
            ``layers.{i}.heads``), or one tensor together with ``sites=``.
        scale: multiplier, applied in float32 before casting to the activation's dtype.
        positions: see :mod:`intervene.positions`.
    """

    def __init__(self, vectors: Mapping[str, torch.Tensor] | torch.Tensor, scale: float = 1.0,
                 positions: PositionsSpec = "all", name: str | None = None, sites: str | list[str] | None = None) -> None:
        super().__init__(_as_site_dict(vectors, sites, "Steering"), positions, name)
        self._scale = float(scale)
        if not math.isfinite(self._scale):
            raise InterventionError(f"Steering: scale must be finite, got {scale!r}")

    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        self._scale = float(value)
        self.invalidate()

    def _prepare(self, v: torch.Tensor) -> torch.Tensor:
        return v.float() * self._scale

    def apply(self, site: str, h: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        m = ctx.mask(self.positions, h.device)
        if m is False or self._scale == 0.0:
            return h
        v = self._vec(site, h)
        return at_positions(m, h + v, h)

    def params(self) -> dict[str, Any]:
        return {"scale": self._scale}

    @classmethod
    def from_saved(cls, sites, positions: Positions, name, params, tensors) -> Steering:
        p = validate(SteeringParams, params, InterventionError, None, "params")
        return cls(cls._vectors_from(tensors, "vector", sites), scale=p.scale, positions=positions, name=name)

    @classmethod
    def from_probe(cls, probe: Any, site: str | list[str], scale: float = 1.0, positions: PositionsSpec = "all",
                   name: str | None = None, index: int | None = None) -> Steering:
        """Steer along a fitted probe's unit ``direction_`` (``index`` picks one of a batched probe)."""
        return cls(_direction_of(probe, index), scale=scale, positions=positions, name=name, sites=site)

    @classmethod
    def from_sae(cls, sae: Any, latent: int, scale: float = 1.0, positions: PositionsSpec = "all",
                 name: str | None = None, unit: bool = True, site: str | None = None) -> Steering:
        """Steer along an SAE latent's decoder row at the SAE's write site (see ``intervene.features``).

        Args:
            sae: an :class:`intervene.features.SAE` (anything with ``write_site`` and ``decoder_direction``).
            unit: ``True`` (default) uses the row divided by its norm, so ``scale`` is a distance in
                activation space (comparable across latents and with probe directions). ``False`` uses
                the raw row, so ``scale`` is in the latent's own units: adding ``scale * W_dec[latent]``
                is what the SAE would decode if the latent fired ``scale`` more strongly.
            site: overrides the SAE's site (for SAEs loaded without one).
        """
        target = site or sae.write_site
        if target is None:
            raise InterventionError("the SAE is not attached to a site: pass site=... (e.g. 'layers.6')")
        v = sae.decoder_direction(latent, unit=unit)
        return cls(v, scale=scale, positions=positions, name=name or f"sae_latent_{int(latent)}", sites=target)


class DirectionalAblation(_PerSite):
    """Project out a unit direction ``r`` at each site, optionally adding back ``value * r``.

    ``h <- h - (h·r) r + value * r``; with ``value=None`` the component is simply removed.
    """

    tensor_prefix = "direction"

    def __init__(self, directions: Mapping[str, torch.Tensor] | torch.Tensor, value: float | None = None,
                 positions: PositionsSpec = "all", name: str | None = None, sites: str | list[str] | None = None) -> None:
        dirs = _as_site_dict(directions, sites, "DirectionalAblation")
        unit = {}
        for s, d in dirs.items():
            d = d.detach().float()
            n = d.norm()
            if not torch.isfinite(n) or n == 0:
                raise InterventionError(f"DirectionalAblation: the direction for {s!r} is zero or not finite")
            unit[s] = d / n
        super().__init__(unit, positions, name)
        self.value = None if value is None else float(value)
        if self.value is not None and not math.isfinite(self.value):
            raise InterventionError(f"DirectionalAblation: value must be finite or None, got {value!r}")

    def apply(self, site: str, h: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        m = ctx.mask(self.positions, h.device)
        if m is False:
            return h
        r = self._vec(site, h)
        flat_r = r.reshape(-1)
        hf = h.reshape(*h.shape[:2], -1)
        proj = hf @ flat_r  # [batch, seq]
        coef = proj if self.value is None else proj - self.value
        new = (hf - coef[..., None] * flat_r).view_as(h)
        return at_positions(m, new, h)

    def params(self) -> dict[str, Any]:
        return {"value": self.value}

    @classmethod
    def from_saved(cls, sites, positions: Positions, name, params, tensors) -> DirectionalAblation:
        # The constructor's checks (real, floating, finite, non-zero), plus: saved directions are already
        # unit (within the rounding of their dtype), so they are used as stored -- normalising again
        # would move their last bits.
        p = validate(AblationParams, params, InterventionError, None, "params")
        dirs = cls._vectors_from(tensors, "direction", sites)
        for s, d in dirs.items():
            _check_vector("DirectionalAblation", s, d, "direction")
            norm = float(d.double().norm())
            tol = UNIT_TOL.get(d.dtype, UNIT_TOL_DEFAULT)
            if not abs(norm - 1.0) <= tol:
                raise InterventionError(f"DirectionalAblation: the direction for {s!r} must be unit-norm "
                                        f"(within {tol}), got norm {norm:.6g}")
        obj = cls.__new__(cls)
        _PerSite.__init__(obj, dirs, positions, name)
        obj.value = p.value
        return obj

    @classmethod
    def from_probe(cls, probe: Any, site: str | list[str], value: float | None = None,
                   positions: PositionsSpec = "all", name: str | None = None,
                   index: int | None = None) -> DirectionalAblation:
        """Ablate a fitted probe's ``direction_`` (``index`` picks one of a batched probe)."""
        return cls(_direction_of(probe, index), value=value, positions=positions, name=name, sites=site)
