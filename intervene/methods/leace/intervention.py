"""``ConceptErasure``: a fitted LEACE eraser applied at hook time (Belrose et al., 2023).

At each site the activation, flattened to ``x`` ``[batch, seq, D]`` (``D = n_heads * head_dim`` at a
heads site), becomes

    x - ((x - μ) Rᵀ) Lᵀ        i.e.  (I - L R) x + L R μ

with ``L`` ``[D, k]`` (``proj_left``), ``R`` ``[k, D]`` (``proj_right``) and ``μ`` ``[D]`` (``bias``,
the training mean; absent for a non-affine eraser). This is ``concept_erasure.LeaceEraser.__call__``
term for term, in the same order and dtype promotion, so the hook returns exactly what the peer's
eraser returns on the same activations. Only these three tensors live in the hot path; fitting
(``concept-erasure``'s ``LeaceFitter``) is in :mod:`intervene.methods.leace.fit`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from intervene.errors import InterventionError
from intervene.intervention import Intervention
from intervene.positions import CallContext, Positions, PositionsSpec, at_positions
from intervene.sites import Site, wildcard_match

Eraser = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # (proj_left [D, k], proj_right [k, D], bias [D])


def as_eraser(obj: Any, site: str = "?") -> Eraser:
    """``(proj_left, proj_right, bias)`` from a ``concept_erasure.LeaceEraser`` (or anything with those
    attributes), a mapping with those keys, or such a tuple; checks the shapes agree."""
    if isinstance(obj, tuple):
        left, right, bias = obj
    elif isinstance(obj, Mapping):
        left, right, bias = obj["proj_left"], obj["proj_right"], obj.get("bias")
    else:
        left, right, bias = obj.proj_left, obj.proj_right, getattr(obj, "bias", None)
    tensors = [t for t in (left, right, bias) if t is not None]
    if not all(isinstance(t, torch.Tensor) and t.dtype.is_floating_point and not t.is_complex() for t in tensors):
        raise InterventionError(f"ConceptErasure: the eraser for {site!r} must hold real floating tensors")
    if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0] or left.shape[0] != right.shape[1]:
        raise InterventionError(f"ConceptErasure: the eraser for {site!r} needs proj_left [D, k] and proj_right "
                                f"[k, D], got {tuple(left.shape)} and {tuple(right.shape)}")
    if bias is not None and tuple(bias.shape) != (left.shape[0],):
        raise InterventionError(f"ConceptErasure: the bias for {site!r} has shape {tuple(bias.shape)}, "
                                f"needs ({left.shape[0]},)")
    if len({t.dtype for t in tensors}) != 1:
        raise InterventionError(f"ConceptErasure: the eraser for {site!r} mixes dtypes")
    return left.detach(), right.detach(), None if bias is None else bias.detach()


class ConceptErasure(Intervention):
    """Erase a concept at each site with a LEACE eraser: ``ConceptErasure({"layers.2": eraser})``.

    Args:
        erasers: ``{site: eraser}``, each a ``concept_erasure.LeaceEraser`` (or ``(proj_left, proj_right,
            bias)``); site names may be wildcards matched in order. Or one eraser together with ``sites=``.
        positions: which tokens are erased (see :mod:`intervene.positions`); ``"all"`` bakes.

    ``ConceptErasure.fit(model, tok, rows, sites, ...)`` fits one eraser per site on collected activations
    (:func:`intervene.methods.leace.fit.fit_erasers`); ``fit_info_`` records how.
    """

    def __init__(self, erasers: Mapping[str, Any] | Any, positions: PositionsSpec = "all",
                 name: str | None = None, sites: str | Sequence[str] | None = None) -> None:
        if sites is not None:
            names = [sites] if isinstance(sites, str) else list(sites)
            erasers = dict.fromkeys(names, erasers)
        elif not isinstance(erasers, Mapping):
            raise InterventionError("ConceptErasure: pass {site: eraser}, or one eraser with sites=...")
        self.erasers: dict[str, Eraser] = {s: as_eraser(e, s) for s, e in erasers.items()}
        super().__init__(list(self.erasers), positions, name)
        self._key_of: dict[str, str] = {}
        self.fit_info_: dict[str, Any] = {}

    # ---- binding -------------------------------------------------------------------------------
    def _pattern_for(self, concrete: str) -> str:
        if concrete in self.erasers:
            return concrete
        for pat in self.erasers:
            if wildcard_match(pat, concrete):
                return pat
        raise InterventionError(f"{self.name}: no eraser for site {concrete!r}")

    def eraser(self, site: str) -> Eraser:
        """The ``(proj_left, proj_right, bias)`` used at ``site`` (a concrete name or a key of ``erasers``)."""
        return self.erasers[self._key_of.get(site) or self._pattern_for(site)]

    def bind(self, sites: Mapping[str, Site]) -> None:
        for concrete, site in sites.items():
            key = self._pattern_for(concrete)
            width = self.erasers[key][0].shape[0]
            if site.shape is not None and width != int(torch.Size(site.shape).numel()):
                raise InterventionError(f"{self.name}: the eraser for {concrete!r} acts on {width} features, the "
                                        f"site's activation is {tuple(site.shape)}")
            self._key_of[concrete] = key
        self.invalidate()

    # ---- the edit ------------------------------------------------------------------------------
    def _cast_eraser(self, site: str, h: torch.Tensor) -> Eraser:
        """The eraser on ``h``'s device, in the dtype ``LeaceEraser`` would compute in: the promotion of
        ``h``'s and the eraser's (float32 math on a bf16 model, as the peer does), cached per call site."""
        left, right, bias = self.eraser(site)
        dtype = torch.promote_types(h.dtype, left.dtype)
        ck = (site, h.device, dtype)
        out = self._cast_cache.get(ck)
        if out is None:
            out = tuple(None if t is None else t.to(device=h.device, dtype=dtype) for t in (left, right, bias))
            self._cast_cache[ck] = out
        return out

    def apply(self, site: str, h: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        m = ctx.mask(self.positions, h.device)
        left, right, bias = self._cast_eraser(site, h)
        if m is False or left.shape[1] == 0:  # no token to touch, or a rank-0 eraser: the identity
            return h
        x = h.reshape(*h.shape[:2], -1)  # [batch, seq, D]: a heads site flattened as o_proj reads it
        delta = x - bias if bias is not None else x
        # LeaceEraser.__call__, term for term: the same order of operations gives the same bits
        new = (x - (delta @ right.mH) @ left.mH).type_as(x).view_as(h)
        return at_positions(m, new, h)

    # ---- saving --------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {"fit": self.fit_info_} if self.fit_info_ else {}

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for s, (left, right, bias) in self.erasers.items():
            out[f"proj_left:{s}"], out[f"proj_right:{s}"] = left, right
            if bias is not None:
                out[f"bias:{s}"] = bias
        return out

    @classmethod
    def from_saved(cls, sites: list[str], positions: Positions, name: str, params: dict[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> ConceptErasure:
        erasers = {}
        for s in sites:
            for key in (f"proj_left:{s}", f"proj_right:{s}"):
                if key not in tensors:
                    raise InterventionError(f"missing tensor {key!r}")
            erasers[s] = (tensors[f"proj_left:{s}"], tensors[f"proj_right:{s}"], tensors.get(f"bias:{s}"))
        out = cls(erasers, positions=positions, name=name)
        out.fit_info_ = dict(params.get("fit") or {})
        return out

    # ---- fitting -------------------------------------------------------------------------------
    @classmethod
    def fit(cls, model: Any, tok: Any, data: Any, sites: str | Sequence[str], config: Any = None, *,
            name: str | None = None, **kwargs: Any) -> ConceptErasure:
        """Fit one eraser per site on ``data``'s activations (with ``concept-erasure``'s ``LeaceFitter``), applied
        at ``config.positions``; the other arguments are :func:`~intervene.methods.leace.fit.fit_erasers`'s."""
        from intervene.methods.leace.fit import fit_erasers

        erasers, cfg, info = fit_erasers(model, tok, data, sites, config, **kwargs)
        out = cls(erasers, positions=cfg.positions, name=name)
        out.fit_info_ = info
        return out

    def to_leace(self, site: str) -> Any:
        """The eraser at ``site`` as a ``concept_erasure.LeaceEraser`` (for use outside a model)."""
        from concept_erasure import LeaceEraser

        left, right, bias = self.eraser(site)
        return LeaceEraser(left, right, bias)
