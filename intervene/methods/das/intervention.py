"""Distributed alignment search (Geiger, Wu, Potts, Icard, Goodman 2023): interchange in a learned rotated subspace.

A base run and a source run meet at one site. With ``W`` an orthogonal ``[n, n]`` matrix (row convention, as
pyvene: a state ``h`` has rotated coordinates ``h·W``; the first ``k`` columns of ``W`` span the subspace)::

    h' = mix(h·W, s·W) · Wᵀ,    mix(b, s) = [s_1..s_k, b_{k+1}..b_n]                       (DAS)
    mix(b, s) = (1 − m) ⊙ b + m ⊙ s,   m_i = σ((β·n − i − ½) / τ)                          (Boundless DAS)

at the positions where the base takes the source's values (``s`` is the source run's activation there) and
``h`` unchanged elsewhere. ``W`` is kept orthogonal by PyTorch's orthogonal parametrization
(:class:`~intervene.training.Orthonormal`), ``β`` is learned and ``τ`` annealed while training (Wu et al.
2023). Our mask has one soft edge at ``β·n`` (pyvene's also has one at 0, which caps ``m_0`` at ½). With
``W = I`` and ``k = n``, ``h' = s`` exactly: the full interchange.

The source is per-call state: the per-example :class:`~intervene.methods.patching.Patch` the patching package's
``interchange_patch`` builds, recorded by a source forward that stops after the site (``sources.py``)::

    with das.interchange(ivm, base, source, positions=[-1]):
        logits = ivm(**base).logits

Everything is computed in float32 (the rotation's dtype) and cast back, so bf16 models train fp32 rotations.
A DAS depends on a second input at call time, so it never bakes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from intervene.errors import InterventionError
from intervene.hparams import make_config
from intervene.intervenable import Intervenable
from intervene.intervention import Intervention
from intervene.methods.das.config import DASConfig
from intervene.methods.das.sources import source_patch
from intervene.methods.patching import Patch
from intervene.positions import CallContext, Positions, PositionsSpec
from intervene.sites import Site, resolve_site
from intervene.training import Orthonormal


def site_width(site: Site) -> int:
    """The flattened width of a site's activation (``n_heads·head_dim`` for a heads site)."""
    shape = site.shape
    if shape is None:
        raise InterventionError(f"the width of site {site.name!r} is unknown; use a canonical site")
    return int(torch.Size(shape).numel())


class DAS(Intervention):
    """Interchange of the first ``k`` rotated dimensions at one site (see the module docstring).

    Args:
        site: one site (no wildcard), e.g. ``layers.0`` or ``layers.0.heads``.
        width: its flattened width.
        k: how many rotated dimensions take the source's values (``0 <= k <= width``; 0 changes nothing).
        positions: the default base positions of :meth:`interchange` (own-token indices; ``[-1]``: the last).
        rotation: a starting ``[width, width]`` orthogonal matrix (default: random, seeded by ``seed``).
    """

    history_: list[dict[str, float]]  # set by fit: one entry per evaluation

    def __init__(self, site: str, width: int, k: int, positions: PositionsSpec = (-1,),
                 rotation: torch.Tensor | None = None, seed: int = 0, name: str | None = None) -> None:
        if not isinstance(site, str) or "*" in site:
            raise InterventionError(f"DAS works at one site, got {site!r}")
        super().__init__(site, list(positions) if isinstance(positions, tuple) else positions, name)
        if not 0 <= int(k) <= int(width):
            raise InterventionError(f"DAS k must be in [0, {width}], got {k}")
        self.site, self.width, self.k = site, int(width), int(k)
        self.rotation = Orthonormal(self.width, self.width, init=rotation,
                                    generator=torch.Generator().manual_seed(int(seed)))
        self.rotation.eval()
        self._source: Patch | None = None
        self._bound: dict[str, Site] = {}
        self.config: dict[str, Any] = {}

    @classmethod
    def create(cls, model: nn.Module | Intervenable, site: str, *args: Any, **kwargs: Any) -> Any:
        """One sized for ``site`` on ``model``: ``DAS.create(model, "layers.0", k)`` (other arguments as for the
        constructor, after the width)."""
        model = model.model if isinstance(model, Intervenable) else model
        return cls(site, site_width(resolve_site(model, site)), *args, **kwargs)

    # ---- the subspace --------------------------------------------------------------------------
    def weight(self) -> torch.Tensor:
        """The ``[width, width]`` rotation ``W`` (float32; differentiable while training)."""
        return self.rotation()

    def mix(self, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Rotated coordinates ``[N, n]`` after the interchange: the source's first ``k``, the base's rest."""
        return torch.cat([source[:, :self.k], base[:, self.k:]], dim=-1)

    def _is_noop(self) -> bool:
        return self.k == 0

    # ---- the hook ------------------------------------------------------------------------------
    def apply(self, site: str, h: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        patch = self._source
        if patch is None or self._is_noop():
            return h
        m = ctx.mask(patch.positions, h.device)
        if m is False:
            return h
        s = patch.apply(site, h, ctx)  # the source's values at the interchanged positions
        b, t = h.shape[:2]
        hf, sf = h.reshape(b, t, -1), s.reshape(b, t, -1)
        idx = (torch.ones(b, t, dtype=torch.bool, device=h.device) if m is None else m).nonzero(as_tuple=True)
        w = self.weight().to(h.device)
        # only the interchanged rows are rotated (usually one token per row), in float32
        rb, rs = hf[idx].to(w.dtype) @ w, sf[idx].to(w.dtype) @ w
        new = (self.mix(rb, rs) @ w.T).to(h.dtype)
        return hf.index_put(idx, new).view_as(h)

    # ---- per-call source -----------------------------------------------------------------------
    def set_source(self, patch: Patch | None, sites: Mapping[str, Site] | None = None) -> None:
        """Interchange with ``patch``'s values (a per-example :class:`Patch` at this site, e.g. from
        ``interchange_patch``) from the next call on; ``None`` stops. ``sites`` binds it (default: the
        sites this DAS was attached with)."""
        if patch is not None:
            if patch.sites != [self.site]:
                raise InterventionError(f"{self.name}: the source patch is at {patch.sites}, the DAS at {self.site!r}")
            bound = dict(sites) if sites is not None else self._bound
            if not bound:
                raise InterventionError(f"{self.name}: attach the DAS (or pass sites=...) before setting a source")
            patch.bind(bound)
        self._source = patch

    @contextlib.contextmanager
    def interchanging(self, patch: Patch, sites: Mapping[str, Site] | None = None) -> Iterator[DAS]:
        """:meth:`set_source` for the duration of a ``with`` block (the previous source comes back after)."""
        prev = self._source
        self.set_source(patch, sites)
        try:
            yield self
        finally:
            self._source = prev

    @contextlib.contextmanager
    def interchange(self, target: nn.Module | Intervenable, base: Mapping[str, torch.Tensor],
                    source: Mapping[str, torch.Tensor], positions: Sequence[int] | Sequence[Sequence[int]] | None = None,
                    source_positions: Sequence[int] | Sequence[Sequence[int]] | None = None) -> Iterator[DAS]:
        """Record ``source`` (tokenizer output) at this site, then interchange into the next calls on ``base``'s rows;
        ``positions`` default to this DAS's own (e.g. ``[-1]``). The source runs through the model as it is (edits
        attached before this DAS apply to it, as in ``interchange_patch``; this DAS itself has no source then)."""
        model = target.model if isinstance(target, Intervenable) else target
        if positions is None:
            if self.positions.kind != "indices":
                raise InterventionError(f"{self.name}: pass positions=...; its own are {self.positions.to_json()!r}")
            positions = list(self.positions.indices)
        sites = self._bound or {self.site: resolve_site(model, self.site)}
        patch = source_patch(model, base, source, sites[self.site], positions, source_positions,
                             name=f"{self.name}-src")
        with self.interchanging(patch, sites):
            yield self

    # ---- fitting -------------------------------------------------------------------------------
    @classmethod
    def fit(cls, model: nn.Module, tok: Any, pairs: Sequence[Mapping[str, Any]], site: str,
            config: DASConfig | None = None, *, positions: PositionsSpec = (-1,),
            source_positions: Sequence[int] | Sequence[Sequence[int]] | None = None,
            val_pairs: Sequence[Mapping[str, Any]] | None = None, name: str | None = None, progress: bool = True,
            checkpoint_dir: str | None = None, resume: bool = False, **hyperparameters: Any) -> DAS:
        """Train a rotation at ``site`` on (base, source, counterfactual) ``pairs`` with the model frozen.

        Args:
            pairs: dicts with ``base`` and ``source`` prompts and the ``counterfactual`` answer (its first token
                is the target), optionally ``choices`` (answer strings, for IIA).
            config: a :class:`DASConfig`; keyword ``hyperparameters`` (``k=2, lr=1e-2``) override its fields.
                ``BoundlessDAS.fit`` (or ``boundless=True``) learns the mask instead of a fixed ``k``.
            positions / source_positions: own-token indices interchanged in each base / source (``[-1]``: the
                last token; one list per pair also works).
            val_pairs: the early-stopping set (default: a ``val_fraction`` split of ``pairs``).
            checkpoint_dir / resume: write resumable checkpoints there / continue from the latest one.

        Returns the trained intervention with ``history_`` (per evaluation) and ``config`` (saved in the diff).
        """
        from intervene.methods.das.fit import train_das

        cfg = make_config(DASConfig, config, **hyperparameters)
        if cls is BoundlessDAS and not cfg.boundless:
            cfg = make_config(DASConfig, cfg, boundless=True)
        pos: Any = list(positions) if isinstance(positions, tuple) else positions
        das: DAS
        if cfg.boundless:
            das = BoundlessDAS.create(model, site, positions=pos, boundary=cfg.boundary_init,
                                      temperature=cfg.temperature_start, temperature_end=cfg.temperature_end,
                                      seed=cfg.seed, name=name)
        else:
            das = DAS.create(model, site, cfg.k, positions=pos, seed=cfg.seed, name=name)
        train_das(das, model, tok, pairs, cfg, positions=pos, source_positions=source_positions, val_pairs=val_pairs,
                  progress=progress, checkpoint_dir=checkpoint_dir, resume=resume)
        return das

    # ---- binding and persistence ---------------------------------------------------------------
    def bind(self, sites: Mapping[str, Site]) -> None:
        if list(sites) != [self.site]:
            raise InterventionError(f"{self.name}: DAS works at one site, {self.site!r} resolved to {list(sites)}")
        width = site_width(sites[self.site])
        if width != self.width:
            raise InterventionError(f"{self.name}: the rotation is {self.width} wide, site {self.site!r} is {width}")
        self._bound = dict(sites)

    def invalidate(self) -> None:
        super().invalidate()
        self.rotation.invalidate()

    def params(self) -> dict[str, Any]:
        return {"width": self.width, "k": self.k, "config": self.config}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"rotation": self.weight().detach()}

    def expected_shapes(self, sites: Mapping[str, Site]) -> dict[str, tuple[int, ...]]:
        return {"rotation": (self.width, self.width)}

    @classmethod
    def _check_saved(cls, sites: list[str], params: dict[str, Any], tensors: Mapping[str, torch.Tensor],
                     extra: tuple[str, ...] = ()) -> int:
        if len(sites) != 1:
            raise InterventionError(f"a DAS works at one site, the diff lists {sites}")
        width = params.get("width")
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise InterventionError(f"params.width must be a positive integer, got {width!r}")
        want = {"rotation": (width, width), **{k: (1,) for k in extra}}
        have = {k: tuple(v.shape) for k, v in tensors.items()}
        if have != want:
            raise InterventionError(f"DAS tensors {have} do not match its width {width} (expects {want})")
        return width

    @classmethod
    def from_saved(cls, sites: list[str], positions: Positions, name: str, params: dict[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> DAS:
        width = cls._check_saved(sites, params, tensors)
        out = cls(sites[0], width, int(params.get("k", 0)), positions=positions, rotation=tensors["rotation"],
                  name=name)
        out.config = dict(params.get("config") or {})
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, site={self.site!r}, width={self.width}, k={self.k})"


class BoundaryMask(nn.Module):
    """Boundless DAS's soft mask over rotated dimensions: a learned boundary ``β`` and a temperature ``τ``."""

    temperature: torch.Tensor
    index: torch.Tensor

    def __init__(self, width: int, boundary: float = 0.5, temperature: float = 50.0) -> None:
        super().__init__()
        self.width = int(width)
        self.boundary = nn.Parameter(torch.tensor([float(boundary)]))
        self.register_buffer("temperature", torch.tensor([float(temperature)]))
        self.register_buffer("index", torch.arange(self.width, dtype=torch.float32) + 0.5, persistent=False)

    def forward(self) -> torch.Tensor:
        """``[width]`` float32 mask ``σ((clamp(β, 1e-3, 1)·n − (i + ½)) / τ)``."""
        beta = self.boundary.clamp(1e-3, 1.0)
        return torch.sigmoid((beta * self.width - self.index) / self.temperature)


class BoundlessDAS(DAS):
    """DAS with a learned soft mask instead of a fixed ``k`` (Wu, Geiger, Icard, Potts, Goodman 2023).

    ``k`` is not chosen: the boundary ``β`` (a fraction of the width, learned, penalised by the fit) sets
    how many rotated dimensions interchange, and the temperature falls from ``temperature`` to
    ``temperature_end`` over the optimizer steps (:meth:`on_train_step`). :attr:`k` reads the mask's
    size: the dimensions with ``m_i > ½``.
    """

    def __init__(self, site: str, width: int, positions: PositionsSpec = (-1,), rotation: torch.Tensor | None = None,
                 boundary: float = 0.5, temperature: float = 50.0, temperature_end: float = 0.1, seed: int = 0,
                 name: str | None = None) -> None:
        super().__init__(site, width, width, positions, rotation, seed, name)
        self.mask = BoundaryMask(self.width, boundary, temperature).eval()
        self.temperature_start, self.temperature_end = float(temperature), float(temperature_end)

    @property  # type: ignore[override]
    def k(self) -> int:
        """Rotated dimensions the mask interchanges more than half of."""
        with torch.no_grad():
            return int((self.mask() > 0.5).sum())

    @k.setter
    def k(self, value: int) -> None:  # the base class sets k; the mask decides it here
        pass

    def mix(self, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        m = self.mask().to(base.device)
        return (1.0 - m) * base + m * source

    def _is_noop(self) -> bool:
        if self.mask.training:
            return False
        with torch.no_grad():  # a mask of exact zeros interchanges nothing: return h untouched
            return not bool(self.mask().any())

    def on_train_step(self, step: int, total: int) -> None:
        """Anneal ``τ`` linearly from its start to its end over the run's optimizer steps."""
        frac = min(1.0, step / max(1, total))
        with torch.no_grad():
            self.mask.temperature.fill_(self.temperature_start + (self.temperature_end - self.temperature_start) * frac)

    def params(self) -> dict[str, Any]:
        return {"width": self.width, "temperature_start": self.temperature_start,
                "temperature_end": self.temperature_end, "config": self.config}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"rotation": self.weight().detach(), "boundary": self.mask.boundary.detach(),
                "temperature": self.mask.temperature.detach()}

    def expected_shapes(self, sites: Mapping[str, Site]) -> dict[str, tuple[int, ...]]:
        return {"rotation": (self.width, self.width), "boundary": (1,), "temperature": (1,)}

    @classmethod
    def from_saved(cls, sites: list[str], positions: Positions, name: str, params: dict[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> BoundlessDAS:
        width = cls._check_saved(sites, params, tensors, extra=("boundary", "temperature"))
        out = cls(sites[0], width, positions=positions, rotation=tensors["rotation"],
                  temperature=float(params.get("temperature_start", 50.0)),
                  temperature_end=float(params.get("temperature_end", 0.1)), name=name)
        with torch.no_grad():
            out.mask.boundary.copy_(tensors["boundary"])
            out.mask.temperature.copy_(tensors["temperature"])
        out.config = dict(params.get("config") or {})
        return out
