"""Activation patching: set an activation to values from a source, or add noise to it.

``Patch`` writes ``h' = h + P(s − h)`` at its sites and positions: ``P`` is the identity (a full patch,
``h' = s``) or the orthogonal projection onto the span of given ``directions`` (a subspace patch);
with ``heads`` only those heads of a ``layers.{i}.heads`` site change. The source ``s`` is

* **constant** — one value per site, the same at every patched token of every row (zero ablation,
  mean ablation): ``[*site_shape]``. Saved in diffs;
* **per example** (``per_example=True``) — ``[n_examples, *site_shape]``, one value per input row,
  used at every patched position of that row (resample ablation, a source run's last token);
* **aligned** (``per_example=True``, ``positions`` a list or one list per example) —
  ``[n_examples, k, *site_shape]``: the ``j``-th listed position of row ``i`` gets ``values[i, j]``
  (interchange interventions: source positions mapped to base positions row by row).

Per-example values depend on the inputs they came from, so they are run-time only: saving them
raises ``InterventionError`` (save a constant, e.g. a dataset mean, instead).

``Noise`` adds ``scale · ε`` with ``ε ~ N(0, I)`` drawn from a seed per (example, position): the same
token gets the same draw whatever the call, so it is exact under the KV cache.

``site_shape`` is ``[width]``, or ``[n_heads, head_dim]`` for ``layers.{i}.heads``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from intervene.errors import InterventionError
from intervene.intervention import Intervention
from intervene.positions import CallContext, Positions, PositionsSpec, at_positions
from intervene.sites import Site, wildcard_match


def _site_dict(values: Mapping[str, torch.Tensor] | torch.Tensor, sites: str | Sequence[str] | None,
               what: str) -> dict[str, torch.Tensor]:
    if isinstance(values, torch.Tensor):
        if sites is None:
            raise InterventionError(f"{what}: pass sites=... with a single tensor, or a dict {{site: tensor}}")
        return {s: values for s in ([sites] if isinstance(sites, str) else list(sites))}
    if sites is not None:
        raise InterventionError(f"{what}: sites=... is only for a single tensor; the dict already names them")
    out = dict(values)
    for s, v in out.items():
        if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point:
            raise InterventionError(f"{what}: the value for {s!r} must be a floating tensor")
        if not bool(torch.isfinite(v).all()):
            raise InterventionError(f"{what}: the value for {s!r} is not finite")
    return out


def _orthonormal(directions: torch.Tensor, what: str) -> torch.Tensor:
    """Orthonormal rows ``[k, width]`` spanning ``directions`` ``[k, width]`` (float32)."""
    d = torch.as_tensor(directions).detach().float()
    if d.ndim == 1:
        d = d[None]
    if d.ndim != 2 or d.shape[0] == 0 or not bool(torch.isfinite(d).all()):
        raise InterventionError(f"{what}: directions must be a finite [k, width] tensor")
    q, r = torch.linalg.qr(d.T)
    if bool((r.diagonal().abs() <= 1e-6 * r.diagonal().abs().max().clamp_min(1e-30)).any()):
        raise InterventionError(f"{what}: the directions are linearly dependent")
    return q.T.contiguous()


class Patch(Intervention):
    """Set activations to source values (see the module docstring).

    Args:
        values: ``{site: tensor}`` or one tensor with ``sites=``; shapes as in the module docstring.
        positions: which tokens; with aligned values, the list (or per-example lists) they align with.
        per_example: the values have leading example (and position) dimensions.
        heads: for ``layers.{i}.heads`` sites, patch only these heads (others keep their activation).
        directions: ``[k, width]``; patch only the component in their span (``h + P(s − h)``).
    """

    def __init__(self, values: Mapping[str, torch.Tensor] | torch.Tensor, positions: PositionsSpec = "all",
                 name: str | None = None, sites: str | Sequence[str] | None = None, per_example: bool = False,
                 heads: Sequence[int] | None = None, directions: torch.Tensor | None = None) -> None:
        vals = _site_dict(values, sites, "Patch")
        super().__init__(list(vals), positions, name)
        self.values = {s: v.detach() for s, v in vals.items()}
        self.per_example = bool(per_example)
        self.heads = None if heads is None else sorted({int(h) for h in heads})
        if self.heads is not None and (not self.heads or self.heads[0] < 0):
            raise InterventionError(f"Patch heads must be non-negative head indices, got {heads}")
        if self.heads is not None and directions is not None:
            raise InterventionError("Patch: give heads or directions, not both")
        self.directions = None if directions is None else _orthonormal(directions, "Patch")
        if self.per_example and self.positions.kind not in ("all", "prompt", "last", "indices", "per_example"):
            raise InterventionError("Patch: per-example values need positions within the prompt")
        self._shape: dict[str, tuple[int, ...]] = {}
        self._key: dict[str, str] = {}
        self._aligned: dict[str, bool] = {}
        self._head_masks: dict[tuple[torch.device, int], torch.Tensor] = {}

    # ---- binding -----------------------------------------------------------------------------
    def _pattern(self, concrete: str) -> str:
        if concrete in self.values:
            return concrete
        for pat in self.values:
            if wildcard_match(pat, concrete):
                return pat
        raise InterventionError(f"{self.name}: no value for site {concrete!r}")

    def bind(self, sites: Mapping[str, Site]) -> None:
        for concrete, site in sites.items():
            key = self._pattern(concrete)
            v = self.values[key]
            shape = site.shape
            if shape is None:
                raise InterventionError(f"{self.name}: the width of {concrete!r} is unknown; patch a canonical site")
            if self.heads is not None:
                if site.heads is None:
                    raise InterventionError(f"{self.name}: heads=... needs a layers.{{i}}.heads site, not {concrete!r}")
                if self.heads[-1] >= site.heads[0]:
                    raise InterventionError(f"{self.name}: {concrete!r} has {site.heads[0]} heads; asked for {self.heads}")
            width = int(torch.Size(shape).numel())
            if self.directions is not None and self.directions.shape[1] != width:
                raise InterventionError(f"{self.name}: directions are {self.directions.shape[1]} wide, {concrete!r} "
                                        f"is {width}")
            lead = v.ndim - len(shape)
            if self.per_example:
                ok = lead in (1, 2) and tuple(v.shape[lead:]) == tuple(shape)
            else:
                ok = tuple(v.shape) == tuple(shape) or (v.ndim == 1 and v.numel() == width)
            if not ok:
                want = "[n_examples, *site] or [n_examples, k, *site]" if self.per_example else "[*site]"
                raise InterventionError(f"{self.name}: the value for {concrete!r} has shape {tuple(v.shape)}; "
                                        f"want {want} with site shape {tuple(shape)}")
            aligned = self.per_example and lead == 2
            if aligned and self.positions.kind not in ("indices", "per_example"):
                raise InterventionError(f"{self.name}: values aligned with positions need positions given as a list "
                                        "or one list per example")
            if aligned and self.positions.kind == "indices" and v.shape[1] != len(self.positions.indices):
                raise InterventionError(f"{self.name}: {v.shape[1]} aligned values for "
                                        f"{len(self.positions.indices)} positions")
            if aligned and self.positions.kind == "per_example":
                rows = self.positions.indices
                if len(rows) != v.shape[0] or any(len(r) > v.shape[1] for r in rows):
                    raise InterventionError(f"{self.name}: aligned values {tuple(v.shape[:2])} do not cover the "
                                            f"per-example positions ({len(rows)} rows, up to "
                                            f"{max(len(r) for r in rows)} positions)")
            self._key[concrete], self._shape[concrete], self._aligned[concrete] = key, tuple(shape), aligned
        self.invalidate()

    # ---- the edit ----------------------------------------------------------------------------
    def _source(self, site: str, h: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        """``s`` broadcastable to ``h`` ``[batch, seq, *site]``, in ``h``'s dtype."""
        v = self.cast(site, self.values[self._key[site]], h)
        shape = self._shape[site]
        if not self.per_example:
            return v.reshape(shape)
        ex = ctx.example_index().to(h.device)
        if not self._aligned[site]:
            return v[ex].reshape(ex.shape[0], 1, *shape)
        listed = ctx.listed(self.positions).to(h.device)  # [batch, k], -1 where a row lists fewer
        match = ctx.abs_pos.to(h.device)[:, :, None] == listed[:, None, :]  # [batch, seq, k]
        j = match.to(torch.int32).argmax(-1)  # which listed position each token is (0 where none)
        return v[ex[:, None], j]  # [batch, seq, *site]

    def apply(self, site: str, h: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        m = ctx.mask(self.positions, h.device)
        if m is False:
            return h
        s = self._source(site, h, ctx)
        if self.directions is not None:
            q = self.cast("directions", self.directions, h.new_empty((), dtype=torch.float32))
            flat = h.reshape(*h.shape[:2], -1).float()
            diff = s.reshape(*s.shape[:2], -1).float() - flat if s.ndim > 1 else s.reshape(-1).float() - flat
            new = (flat + (diff @ q.T) @ q).to(h.dtype).view_as(h)
        else:
            new = s.expand_as(h).contiguous() if s.shape != h.shape else s  # downstream may add in place
        if self.heads is not None:
            sel = self._head_mask(h)
            new = torch.where(sel, new, h)
        return at_positions(m, new, h)

    def _head_mask(self, h: torch.Tensor) -> torch.Tensor:
        """``[n_heads, 1]`` bool: the heads this patch replaces."""
        key = (h.device, h.shape[-2])
        sel = self._head_masks.get(key)
        if sel is None:
            sel = torch.zeros(h.shape[-2], 1, dtype=torch.bool, device=h.device)
            sel[self.heads or []] = True
            self._head_masks[key] = sel
        return sel

    # ---- persistence -------------------------------------------------------------------------
    def _saveable(self) -> None:
        if self.per_example:
            raise InterventionError(
                f"{self.name}: a Patch with per-example source values is run-time only (the values belong to the "
                "inputs they were recorded from); save a constant patch instead, e.g. Patch.mean(activations)")

    def params(self) -> dict[str, Any]:
        self._saveable()
        return {"heads": self.heads}

    def tensors(self) -> dict[str, torch.Tensor]:
        self._saveable()
        out = {f"value:{s}": v for s, v in self.values.items()}
        if self.directions is not None:
            out["directions"] = self.directions
        return out

    @classmethod
    def from_saved(cls, sites: list[str], positions: Positions, name: str, params: dict[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> Patch:
        missing = [s for s in sites if f"value:{s}" not in tensors]
        if missing:
            raise InterventionError(f"missing tensors for sites {missing}")
        heads = params.get("heads")
        if heads is not None and (not isinstance(heads, list) or not all(isinstance(h, int) and not isinstance(h, bool)
                                                                           for h in heads)):
            raise InterventionError("params.heads must be null or a list of head indices")
        return cls({s: tensors[f"value:{s}"] for s in sites}, positions=positions, name=name, heads=heads,
                   directions=tensors.get("directions"))

    # ---- common patches ----------------------------------------------------------------------
    @classmethod
    def zero(cls, model_sites: Mapping[str, Site], positions: PositionsSpec = "all", name: str | None = None,
             heads: Sequence[int] | None = None) -> Patch:
        """Zero ablation at resolved sites (``intervene.resolve_sites(model, ...)`` as a dict name -> Site)."""
        vals = {}
        for n, s in model_sites.items():
            if s.shape is None:
                raise InterventionError(f"the width of {n!r} is unknown")
            vals[n] = torch.zeros(s.shape)
        return cls(vals, positions=positions, name=name or "zero_ablation", heads=heads)

    @classmethod
    def mean(cls, activations: Mapping[str, torch.Tensor], sites: Sequence[str] | None = None,
             positions: PositionsSpec = "all", name: str | None = None, heads: Sequence[int] | None = None) -> Patch:
        """Mean ablation: each site set to its mean over ``activations`` (``[N, *site]`` or ``[N, k, *site]``,
        e.g. from ``iv.collect``; positions ``"all"`` collections are flat ``[tokens, *site]``)."""
        names = list(sites) if sites is not None else list(activations)
        vals = {}
        for n in names:
            a = torch.as_tensor(activations[n]).float()
            heads_site = n.endswith(".heads")
            keep = 2 if heads_site else 1  # trailing dims of one activation
            vals[n] = a.reshape(-1, *a.shape[a.ndim - keep:]).mean(0)
        return cls(vals, positions=positions, name=name or "mean_ablation", heads=heads)

    @classmethod
    def resample(cls, activations: Mapping[str, torch.Tensor], n_examples: int, sites: Sequence[str] | None = None,
                 positions: PositionsSpec = "all", seed: int = 0, derange: bool = False, name: str | None = None,
                 heads: Sequence[int] | None = None) -> Patch:
        """Resample ablation: example ``i`` of the next batch gets a row drawn (seeded, with replacement) from
        ``activations`` (``[N, *site]``, e.g. ``iv.collect(..., positions="last")``), used at every patched position.

        ``derange=True`` draws a random permutation with no fixed point instead (``N == n_examples``: each
        example gets *another* example's activation, when the pool is the batch's own data).
        """
        names = list(sites) if sites is not None else list(activations)
        pools = {n: torch.as_tensor(activations[n]).float() for n in names}
        size = {int(v.shape[0]) for v in pools.values()}
        if len(size) != 1:
            raise InterventionError(f"resample: the sites hold different numbers of rows {sorted(size)}")
        pool = size.pop()
        g = torch.Generator().manual_seed(seed)
        if derange:
            if pool != n_examples or pool < 2:
                raise InterventionError("derange needs a pool of exactly n_examples >= 2 rows")
            shift = torch.randint(1, pool, (1,), generator=g)
            perm = torch.randperm(pool, generator=g)
            rows = torch.empty(pool, dtype=torch.long)
            rows[perm] = perm.roll(int(shift))  # a cyclic shift of a random order: nobody keeps their own row
        else:
            rows = torch.randint(0, pool, (n_examples,), generator=g)
        return cls({n: v[rows] for n, v in pools.items()}, positions=positions, per_example=True,
                   name=name or "resample_ablation", heads=heads)

    def __repr__(self) -> str:
        kind = "per-example" if self.per_example else "constant"
        return f"Patch(name={self.name!r}, sites={self.sites}, {kind}, positions={self.positions.to_json()!r})"


class Noise(Intervention):
    """Add ``scale · ε`` at its sites and positions, ``ε ~ N(0, I)`` seeded per (example, own position).

    Args:
        scale: the noise's standard deviation (a float; causal tracing uses 3x the embeddings' std).
        seed: draws are a function of ``(seed, example, position)`` only, so every forward call (and the
            KV cache on or off) sees the same noise on the same token.
        example_ids: optional per-row ids to draw by instead of the row's example index (rows with the
            same id get the same noise; causal tracing repeats each noise sample across restored cells).
    """

    def __init__(self, sites: str | Sequence[str], scale: float, positions: PositionsSpec = "all", seed: int = 0,
                 name: str | None = None, example_ids: Sequence[int] | None = None) -> None:
        super().__init__(sites, positions, name)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 <= float(scale) < float("inf"):
            raise InterventionError(f"Noise scale must be a finite number >= 0, got {scale!r}")
        self.scale, self.seed = float(scale), int(seed)
        self.example_ids = None if example_ids is None else torch.as_tensor(list(example_ids), dtype=torch.long)
        self._shape: dict[str, tuple[int, ...]] = {}
        self._draws: dict[tuple[str, int, int], torch.Tensor] = {}

    def bind(self, sites: Mapping[str, Site]) -> None:
        self._shape = {n: tuple(s.shape) for n, s in sites.items() if s.shape is not None}
        self._draws.clear()

    def draw(self, site: str, n_ids: int, pos: int, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """``[n_ids, *shape]`` float32 noise of own-token position ``pos`` (cached; ``shape`` defaults to the
        site's, known for canonical sites and taken from the activation for raw module paths)."""
        shape = shape or self._shape.get(site)
        if shape is None:
            raise InterventionError(f"{self.name}: the width of {site!r} is not known before a forward")
        key = (site, n_ids, pos)
        out = self._draws.get(key)
        if out is None:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + pos) % (2**63 - 1))
            out = self._draws[key] = torch.randn(n_ids, *shape, generator=g)
        return out

    def apply(self, site: str, h: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        m = ctx.mask(self.positions, h.device)
        if m is False or self.scale == 0.0:
            return h
        ids = (self.example_ids if self.example_ids is not None else ctx.example_index()).to(torch.long)
        if ids.shape[0] != h.shape[0]:
            raise InterventionError(f"{self.name}: {ids.shape[0]} example ids for {h.shape[0]} rows")
        n_ids = int(ids.max()) + 1
        pos = ctx.abs_pos
        sel = torch.ones_like(pos, dtype=torch.bool) if m is None else m.to(pos.device)
        eps = torch.zeros(h.shape, dtype=torch.float32)
        for p in torch.unique(pos[sel]).tolist():
            rows, cols = ((pos == p) & sel).nonzero(as_tuple=True)
            eps[rows, cols] = self.draw(site, n_ids, int(p), tuple(h.shape[2:]))[ids[rows]]
        new = (h.float() + self.scale * eps.to(h.device)).to(h.dtype)
        return at_positions(m, new, h)

    def params(self) -> dict[str, Any]:
        if self.example_ids is not None:
            raise InterventionError(f"{self.name}: example_ids are per call (run-time only); save Noise without them")
        return {"scale": self.scale, "seed": self.seed}

    @classmethod
    def from_saved(cls, sites: list[str], positions: Positions, name: str, params: dict[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> Noise:
        if tensors:
            raise InterventionError(f"noise {name!r} stores no tensors, found {sorted(tensors)}")
        seed = params.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InterventionError("params.seed must be an integer")
        return cls(sites, params.get("scale"), positions=positions, seed=seed, name=name)  # type: ignore[arg-type]
