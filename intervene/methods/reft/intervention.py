"""Representation fine-tuning (Wu, Arora, Wang, Geiger, Jurafsky, Manning, Potts 2024): LoReFT and DiReFT.

At one site and its positions, with ``h`` the (flattened) activation, in the row convention of pyreft::

    LoReFT:  Φ(h) = h + Rᵀ(W h + b − R h) = h + (h·(Wᵀ − P) + b)·Pᵀ,   P = Rᵀ ``[n, r]``, orthonormal columns
    DiReFT:  Φ(h) = h + W₂ᵀ(W₁ h + b)     = h + (h·W₁ᵀ + b)·U,        U ``[r, n]`` unconstrained

``P`` is kept orthonormal by PyTorch's orthogonal parametrization (:class:`~intervene.training.Orthonormal`);
``W``, ``b`` (LoReFT) and ``W₁``, ``b``, ``U`` (DiReFT) are plain parameters. Both start as the identity
(LoReFT ``W = R``, ``b = 0``; DiReFT ``U = 0``), so the untrained edit is a no-op and an early-stopped run can
keep it; pyreft starts ``W`` at random. Computed in float32 (the parameters' dtype) and cast back.

Both are low-rank affine maps of ``h``: ``Φ(h) = (I − L·R)·h + c`` (:meth:`low_rank`). At positions ``"all"`` at a
site that is the input or the output of a linear layer writing the residual (``layers.{i}.heads``, ``layers.{i}.attn``,
``layers.{i}.mlp``), that map folds exactly into the layer (:mod:`intervene.methods.reft.bake`); on the
residual stream itself it does not (the skip connection carries ``h`` past every weight).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from intervene.errors import InterventionError
from intervene.hparams import make_config
from intervene.intervention import Intervention
from intervene.methods.reft.config import ReFTConfig
from intervene.positions import CallContext, Positions, PositionsSpec
from intervene.sites import Site, resolve_site
from intervene.training import Orthonormal


def site_width(site: Site) -> int:
    """The flattened width of a site's activation (``n_heads·head_dim`` for a heads site)."""
    if site.shape is None:
        raise InterventionError(f"the width of site {site.name!r} is unknown; use a canonical site")
    return int(torch.Size(site.shape).numel())


class _ReFT(Intervention):
    """What LoReFT and DiReFT share: one site, a rank, the masked edit ``h + delta(h)``, persistence."""

    history_: list[dict[str, float]]  # set by fit: one entry per evaluation

    def __init__(self, site: str, width: int, rank: int, positions: PositionsSpec = "last",
                 name: str | None = None) -> None:
        if not isinstance(site, str) or "*" in site:
            raise InterventionError(f"{type(self).__name__} works at one site, got {site!r}")
        super().__init__(site, positions, name)
        if not 0 < int(rank) <= int(width):
            raise InterventionError(f"rank must be in [1, {width}], got {rank}")
        self.site, self.width, self.rank = site, int(width), int(rank)
        self.config: dict[str, Any] = {}

    @classmethod
    def create(cls, model: nn.Module, site: str, rank: int, **kwargs: Any) -> Any:
        """An instance sized for ``site`` on ``model`` (keyword arguments as for the constructor)."""
        return cls(site, site_width(resolve_site(model, site)), rank, **kwargs)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``Φ(x) − x`` for float32 rows ``x`` ``[N, width]``."""
        raise NotImplementedError

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(L [n, r], R [r, n], c [n])`` in float64 with ``Φ(h) = (I − L·R)·h + c`` (column vectors)."""
        raise NotImplementedError

    def apply(self, site: str, h: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        m = ctx.mask(self.positions, h.device)
        if m is False:
            return h
        b, t = h.shape[:2]
        hf = h.reshape(b, t, -1)
        if m is None:
            x = hf.float()
            return (x + self.delta(x)).to(h.dtype).view_as(h)
        idx = m.nonzero(as_tuple=True)  # edit only the selected tokens (usually one per row)
        x = hf[idx].float()
        return hf.index_put(idx, (x + self.delta(x)).to(h.dtype)).view_as(h)

    @classmethod
    def fit(cls, model: nn.Module, tok: Any, rows: Any, site: str, config: ReFTConfig | None = None, *,
            val_rows: Any = None, name: str | None = None, progress: bool = True, checkpoint_dir: str | None = None,
            resume: bool = False, **hyperparameters: Any) -> Any:
        """Train at ``site`` so each row's prompt is answered with its target, the model frozen.

        Args:
            rows: dicts with ``text`` (the prompt) and ``target`` (the answer; its first token is scored at the
                prompt's last token), e.g. quirky rows with ``target = choices[label]``.
            config: a :class:`ReFTConfig`; keyword ``hyperparameters`` (``rank=4, lr=4e-3``) override its fields.
            val_rows: the early-stopping set (default: a ``val_fraction`` split of ``rows``).

        Returns the trained intervention with ``history_`` and ``config`` (saved in the diff).
        """
        from intervene.methods.reft.fit import train_reft

        cfg = make_config(ReFTConfig, config, **hyperparameters)
        reft = cls.create(model, site, cfg.rank, positions=cfg.positions, seed=cfg.seed, name=name)
        train_reft(reft, model, tok, rows, cfg, val_rows=val_rows, progress=progress, checkpoint_dir=checkpoint_dir,
                   resume=resume)
        return reft

    def bind(self, sites: Mapping[str, Site]) -> None:
        if list(sites) != [self.site]:
            raise InterventionError(f"{self.name}: works at one site, {self.site!r} resolved to {list(sites)}")
        width = site_width(sites[self.site])
        if width != self.width:
            raise InterventionError(f"{self.name}: built {self.width} wide, site {self.site!r} is {width}")

    def params(self) -> dict[str, Any]:
        return {"width": self.width, "rank": self.rank, "config": self.config}

    @classmethod
    def _check_saved(cls, sites: list[str], params: dict[str, Any], tensors: Mapping[str, torch.Tensor]
                     ) -> tuple[int, int]:
        if len(sites) != 1:
            raise InterventionError(f"{cls.__name__} works at one site, the diff lists {sites}")
        width, rank = params.get("width"), params.get("rank")
        for what, v in (("width", width), ("rank", rank)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InterventionError(f"params.{what} must be a positive integer, got {v!r}")
        want = cls.shapes(width, rank)  # type: ignore[arg-type]
        have = {k: tuple(v.shape) for k, v in tensors.items()}
        if have != want:
            raise InterventionError(f"{cls.__name__} tensors {have} do not match width {width}, rank {rank} "
                                    f"(expects {want})")
        return width, rank  # type: ignore[return-value]

    @staticmethod
    def shapes(width: int, rank: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def expected_shapes(self, sites: Mapping[str, Site]) -> dict[str, tuple[int, ...]]:
        return self.shapes(self.width, self.rank)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, site={self.site!r}, rank={self.rank}, "
                f"positions={self.positions.to_json()!r})")


class LoReFT(_ReFT):
    """Low-rank linear subspace ReFT: ``h + Rᵀ(W h + b − R h)`` with ``R`` ``[r, n]`` orthonormal rows.

    Args:
        site: one site (e.g. ``layers.1``, ``layers.0.heads``); width: its flattened width; rank: ``r``.
        positions: where it edits (default ``"last"``: the prompt's last token).
        rotation, weight, bias: ``P = Rᵀ`` ``[n, r]``, ``W`` ``[r, n]``, ``b`` ``[r]`` to start from (default:
            a seeded random ``P``, ``W = Pᵀ``, ``b = 0``: the identity).
    """

    def __init__(self, site: str, width: int, rank: int, positions: PositionsSpec = "last",
                 rotation: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, seed: int = 0, name: str | None = None) -> None:
        super().__init__(site, width, rank, positions, name)
        self.rotation = Orthonormal(self.width, self.rank, init=rotation,
                                    generator=torch.Generator().manual_seed(int(seed)))
        self.rotation.eval()
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten: leave the global RNG alone
            self.source = nn.Linear(self.width, self.rank)
        with torch.no_grad():
            self.source.weight.copy_(self.rotation().T if weight is None else weight)
            self.source.bias.copy_(torch.zeros(self.rank) if bias is None else bias)

    def projection(self) -> torch.Tensor:
        """``R`` ``[r, n]``: orthonormal rows (differentiable while training)."""
        return self.rotation().T

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        p = self.rotation().to(x.device)
        m = self.source.weight.to(x.device).T - p  # [n, r]: one matmul for W·h − R·h
        return (x @ m + self.source.bias.to(x.device)) @ p.T

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p, w, b = (t.detach().double().cpu() for t in (self.rotation(), self.source.weight, self.source.bias))
        return -p, w - p.T, p @ b  # h + P((W − Pᵀ)h + b)

    def invalidate(self) -> None:
        super().invalidate()
        self.rotation.invalidate()

    @staticmethod
    def shapes(width: int, rank: int) -> dict[str, tuple[int, ...]]:
        return {"rotation": (width, rank), "weight": (rank, width), "bias": (rank,)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"rotation": self.rotation().detach(), "weight": self.source.weight.detach(),
                "bias": self.source.bias.detach()}

    @classmethod
    def from_saved(cls, sites: list[str], positions: Positions, name: str, params: dict[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> LoReFT:
        width, rank = cls._check_saved(sites, params, tensors)
        out = cls(sites[0], width, rank, positions, rotation=tensors["rotation"], weight=tensors["weight"],
                  bias=tensors["bias"], name=name)
        out.config = dict(params.get("config") or {})
        return out


class DiReFT(_ReFT):
    """Direct ReFT (the paper's ablation without orthogonality): ``h + W₂ᵀ(W₁ h + b)``.

    Args as :class:`LoReFT`; ``down`` is ``W₁, b`` (``nn.Linear(n, r)``, seeded random), ``up`` is ``W₂``
    (``[r, n]`` stored as ``nn.Linear(r, n).weight`` ``[n, r]``, zero: the identity).
    """

    def __init__(self, site: str, width: int, rank: int, positions: PositionsSpec = "last",
                 down_weight: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                 up_weight: torch.Tensor | None = None, seed: int = 0, name: str | None = None) -> None:
        super().__init__(site, width, rank, positions, name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.down = nn.Linear(self.width, self.rank)
        self.up = nn.Linear(self.rank, self.width, bias=False)
        with torch.no_grad():
            self.up.weight.zero_()
            for p, v in ((self.down.weight, down_weight), (self.down.bias, down_bias), (self.up.weight, up_weight)):
                if v is not None:
                    p.copy_(v)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        w1, b, w2 = (t.to(x.device) for t in (self.down.weight, self.down.bias, self.up.weight))
        return (x @ w1.T + b) @ w2.T

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w1, b, up = (t.detach().double().cpu() for t in (self.down.weight, self.down.bias, self.up.weight))
        return -up, w1, up @ b  # h + W₂ᵀ(W₁h + b), W₂ᵀ = up.weight

    @staticmethod
    def shapes(width: int, rank: int) -> dict[str, tuple[int, ...]]:
        return {"down.weight": (rank, width), "down.bias": (rank,), "up.weight": (width, rank)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"down.weight": self.down.weight.detach(), "down.bias": self.down.bias.detach(),
                "up.weight": self.up.weight.detach()}

    @classmethod
    def from_saved(cls, sites: list[str], positions: Positions, name: str, params: dict[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> DiReFT:
        width, rank = cls._check_saved(sites, params, tensors)
        out = cls(sites[0], width, rank, positions, down_weight=tensors["down.weight"],
                  down_bias=tensors["down.bias"], up_weight=tensors["up.weight"], name=name)
        out.config = dict(params.get("config") or {})
        return out
