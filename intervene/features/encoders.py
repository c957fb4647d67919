"""What the latent cache can record: SAEs, and any set of directions read as "latents".

A *latent encoder* has ``site`` (where it reads), ``d_sae`` (how many latents), ``encode(x)`` (dense
``[..., d_sae]``), ``encode_sparse(x)`` (COO triples for ``x`` of shape ``[n, d_in]``) and ``describe()``
(a JSON-able summary). :class:`~intervene.features.sae.SAE` is one; :class:`DirectionEncoder` makes a
probe's ``direction_`` or a steering vector one too, so the same cache, examples and explain/score
pipeline run on them.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from intervene.errors import InterventionError


@runtime_checkable
class LatentEncoder(Protocol):
    site: str | None

    @property
    def d_sae(self) -> int: ...

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


class DirectionEncoder(nn.Module):
    """Directions as latents: activation ``i`` is ``x · d_i + bias_i``, kept where it exceeds ``threshold``.

    Args:
        directions: ``[n, d_in]`` (or one ``[d_in]`` vector).
        site: where the activations are read (``layers.6``).
        threshold: record values ``> threshold`` only (``0.0``: the positive side, like a ReLU
            latent); ``None`` records every token's value, signed (dense, ``n`` entries per token).
        bias: optional ``[n]`` offsets (a probe's intercept).
        normalize: divide each direction by its norm first (activations become projections).
        names: optional labels, one per direction (kept in the cache index).
    """

    def __init__(self, directions: torch.Tensor, site: str, threshold: float | None = 0.0,
                 bias: torch.Tensor | None = None, normalize: bool = False, names: list[str] | None = None) -> None:
        super().__init__()
        d = torch.as_tensor(directions).detach().float()
        if d.ndim == 1:
            d = d[None]
        if d.ndim != 2 or d.shape[0] == 0:
            raise InterventionError(f"directions must be [n, d_in] or [d_in], got {tuple(d.shape)}")
        if normalize:
            n = d.norm(dim=-1, keepdim=True)
            if bool((n == 0).any()):
                raise InterventionError("cannot normalize a zero direction")
            d = d / n
        b = torch.zeros(d.shape[0]) if bias is None else torch.as_tensor(bias).detach().float().reshape(-1)
        if b.shape != (d.shape[0],):
            raise InterventionError(f"bias must have shape [{d.shape[0]}], got {tuple(b.shape)}")
        if names is not None and len(names) != d.shape[0]:
            raise InterventionError(f"{len(names)} names for {d.shape[0]} directions")
        self.register_buffer("directions", d.contiguous())
        self.register_buffer("bias", b)
        self.site = site
        self.threshold = None if threshold is None else float(threshold)
        self.names = list(names) if names is not None else None

    @property
    def d_sae(self) -> int:
        return int(self.directions.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.directions.shape[1])

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Raw dot products ``[..., d_in] -> [..., n]`` (no threshold)."""
        return x.to(self.directions.dtype) @ self.directions.T + self.bias

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_in] -> [..., n]``: scores where above the threshold, else 0."""
        s = self.scores(x)
        return s if self.threshold is None else torch.where(s > self.threshold, s, torch.zeros_like(s))

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """COO ``(rows, latents, values)`` of ``x`` ``[n_tok, d_in]``; every entry when unthresholded."""
        s = self.scores(x)
        if self.threshold is None:
            rows = torch.arange(s.shape[0], device=s.device)[:, None].expand_as(s).reshape(-1)
            lat = torch.arange(s.shape[1], device=s.device).repeat(s.shape[0])
            return rows, lat, s.reshape(-1)
        rows, lat = (s > self.threshold).nonzero(as_tuple=True)
        return rows, lat, s[rows, lat]

    def decoder_direction(self, latent: int, unit: bool = True) -> torch.Tensor:
        v = self.directions[int(latent)].clone()
        return v / v.norm() if unit else v

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.directions.numpy().tobytes() + self.bias.numpy().tobytes()).hexdigest()[:16]
        return {"kind": "directions", "site": self.site, "d_in": self.d_in, "d_sae": self.d_sae,
                "threshold": self.threshold, "names": self.names, "digest": digest}

    @classmethod
    def from_probe(cls, probe: Any, site: str, threshold: float | None = 0.0, index: int | None = None,
                   use_intercept: bool = False, name: str | None = None) -> DirectionEncoder:
        """A probe's fitted ``direction_`` (``index`` picks one of a batched probe; ``[k, d]`` is kept whole)."""
        d = getattr(probe, "direction_", None)
        if d is None:
            raise InterventionError(f"{type(probe).__name__} has no fitted direction_ (fit it first)")
        d = torch.as_tensor(d).float()
        if d.ndim > 2 or (d.ndim == 2 and index is not None):
            d = d.reshape(-1, d.shape[-1])[index if index is not None else slice(None)]
        bias = None
        if use_intercept and getattr(probe, "intercept_", None) is not None:
            bias = torch.as_tensor(probe.intercept_).float().reshape(-1)
        n = 1 if d.ndim == 1 else d.shape[0]
        names = [name or type(probe).__name__] if n == 1 else None
        return cls(d, site=site, threshold=threshold, bias=bias, names=names)

    @classmethod
    def from_steering(cls, steering: Any, site: str | None = None, threshold: float | None = 0.0,
                      normalize: bool = True) -> DirectionEncoder:
        """A :class:`~intervene.Steering` vector (of ``site``, or its only site) as one latent."""
        vectors = steering.vectors
        if site is None:
            if len(vectors) != 1:
                raise InterventionError(f"the steering edits {sorted(vectors)}: pass site=...")
            site = next(iter(vectors))
        if site not in vectors:
            raise InterventionError(f"the steering has no vector for {site!r}; it has {sorted(vectors)}")
        return cls(vectors[site].reshape(-1), site=site, threshold=threshold, normalize=normalize,
                   names=[steering.name])
