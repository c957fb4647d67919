"""The ``Intervention`` base class: what every intervention type implements.

An intervention names the sites it edits, the positions it touches, JSON-able hyperparameters
(``params``) and tensors. The hook engine calls :meth:`Intervention.apply` for each site and never
asks what kind of intervention it holds. Saved diffs store the registered *type name*
(:mod:`intervene.registry`); loading builds classes only from the registry, so nothing found in a
file is ever imported or unpickled. See docs/architecture.md for the contract a method implements.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from intervene.errors import InterventionError
from intervene.positions import CallContext, Positions, PositionsSpec
from intervene.sites import Site, expand_sites, resolve_site

_NAME = re.compile(r"^[A-Za-z0-9_\-]+\Z")


class Intervention:
    """Base class. Subclasses implement :meth:`apply` and, to be saved, ``params``/``tensors``.

    Args:
        sites: the site names it edits (wildcards allowed; expanded when attached).
        positions: which tokens it touches (see :mod:`intervene.positions`).
        name: a unique name within an ``Intervenable`` (letters, digits, ``_``, ``-``).
    """

    type_name: ClassVar[str] = "intervention"

    def __init__(self, sites: Sequence[str] | str, positions: PositionsSpec = "all", name: str | None = None) -> None:
        self.sites = [sites] if isinstance(sites, str) else list(sites)
        if not self.sites:
            raise InterventionError(f"{type(self).__name__} needs at least one site")
        self.positions = Positions.parse(positions)
        self.name = name or self.type_name
        if not _NAME.match(self.name):
            raise InterventionError(f"intervention name {self.name!r} may only use letters, digits, '_' and '-'")
        self._cast_cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    # ---- what subclasses implement -------------------------------------------------------------
    def apply(self, site: str, h: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        """Return the edited activation. ``h`` is ``[batch, seq, *site_shape]``; never edit in place."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """JSON-able hyperparameters (enough, with :meth:`tensors`, to rebuild the intervention)."""
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors to save; names may contain any character but must be unique."""
        return {}

    @classmethod
    def from_saved(cls, sites: list[str], positions: Positions, name: str, params: dict[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> Intervention:
        """Rebuild from what :meth:`params` / :meth:`tensors` saved (already shape-checked)."""
        raise NotImplementedError(f"{cls.__name__} cannot be loaded")

    def expected_shapes(self, sites: Mapping[str, Site]) -> dict[str, tuple[int, ...]]:
        """Shapes :meth:`tensors` must have on a model whose resolved sites are ``sites``.

        Used to validate a diff against a model *before* anything is attached.
        """
        return {}

    def bind(self, sites: Mapping[str, Site]) -> None:
        """Called on attach with the resolved sites; validates shapes (raise ``InterventionError``)."""
        want = self.expected_shapes(sites)
        have = self.tensors()
        for k, shape in want.items():
            if k in have and tuple(have[k].shape) != tuple(shape):
                raise InterventionError(f"{self.name}: tensor {k!r} has shape {tuple(have[k].shape)}, "
                                        f"the model's site needs {tuple(shape)}")

    # ---- helpers -------------------------------------------------------------------------------
    def cast(self, key: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``t`` on ``like``'s device and dtype, cached per (key, device, dtype)."""
        ck = (key, like.device, like.dtype)
        out = self._cast_cache.get(ck)
        if out is None:
            out = t.detach().to(device=like.device, dtype=like.dtype)
            self._cast_cache[ck] = out
        return out

    def invalidate(self) -> None:
        """Forget cached casts (call after changing tensors in place)."""
        self._cast_cache.clear()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, sites={self.sites}, positions={self.positions.to_json()!r})"


def resolve(model: Any, interventions: Sequence[Intervention]) -> dict[str, dict[str, Site]]:
    """``{intervention name: {concrete site: Site}}`` on ``model``, binding (so validating) each intervention.

    Wildcards expand in layer order; raises ``SiteError`` / ``InterventionError`` before anything is attached.
    """
    out: dict[str, dict[str, Site]] = {}
    for iv in interventions:
        sites = {n: resolve_site(model, n) for n in expand_sites(model, iv.sites)}
        iv.bind(sites)
        out[iv.name] = sites
    return out
