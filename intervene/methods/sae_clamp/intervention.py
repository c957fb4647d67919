"""Interventions on SAE latents: steer along a decoder row, or clamp a latent exactly.

* :func:`steering_from_sae` returns a plain :class:`~intervene.Steering` at the SAE's (write) site
  whose vector is the latent's decoder row, so it saves, loads and bakes like any steering vector.
* :class:`LatentClamp` (registered as ``"sae_clamp"``) encodes the activation, sets the chosen
  latents to fixed values and adds back only the change in the decoded output, so the SAE's
  reconstruction error (everything the SAE does not explain) is left untouched::

      h' = h + decode(z') - decode(z) = h + sum_i (v_i - z_i(h)) * W_dec[i]

  (exact because decoders are linear; a skip connection cancels in the difference). A diff stores
  only what this needs — the chosen latents' encoder columns, biases, thresholds and decoder
  rows — except for top-k SAEs, whose membership in the top k depends on every latent: there
  the whole encoder (not the decoder) is stored so the clamp stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from intervene.errors import InterventionError
from intervene.features.sae import SAE
from intervene.intervention import Intervention
from intervene.methods.steering import Steering
from intervene.positions import CallContext, Positions, PositionsSpec, at_positions
from intervene.schemas.base import Index, PosInt, Strict, Text, Width, validate
from intervene.sites import Site
from intervene.tensorfile import check_tensor

MAX_LATENTS = 1 << 16


class ClampParams(Strict):
    """``params`` of a saved ``sae_clamp`` intervention."""

    latents: Annotated[list[Index], Field(min_length=1, max_length=MAX_LATENTS)]
    values: Annotated[list[float], Field(min_length=1, max_length=MAX_LATENTS)]
    activation: Literal["relu", "jumprelu", "topk"]
    k: PosInt | None = None
    d_sae: Width
    d_in: Width
    source: Text | None = None


def steering_from_sae(sae: SAE, latent: int, scale: float = 1.0, positions: PositionsSpec = "all",
                      name: str | None = None, unit: bool = True, site: str | None = None) -> Steering:
    """A :class:`Steering` that adds ``scale * d`` at the SAE's write site, ``d`` = the latent's decoder row
    (the same as :meth:`Steering.from_sae`, which documents the arguments)."""
    return Steering.from_sae(sae, latent, scale=scale, positions=positions, name=name, unit=unit, site=site)


class LatentClamp(Intervention):
    """Set SAE latents to fixed values, keeping the SAE's reconstruction error (see the module docstring).

    Args:
        sae: an autoencoder (input and output at the same site). Transcoders read and write at
            different sites; steer them with :func:`steering_from_sae` instead.
        latents: one latent index or several.
        values: the value(s) to clamp to (one per latent, or one for all); ``0`` ablates.
        positions: which tokens (see :mod:`intervene.positions`).

    ``apply`` costs one ``[tokens, d_in] x [d_in, n_latents]`` product (the full encoder for top-k).
    """

    def __init__(self, sae: SAE, latents: int | Sequence[int], values: float | Sequence[float] = 0.0,
                 positions: PositionsSpec = "all", name: str | None = None, site: str | None = None) -> None:
        if sae.activation not in ("relu", "jumprelu", "topk"):
            # groupmax picks one winner per group of latents: clamping some latents would need every group's
            # full encoder and its argmax rule at hook time, which this clamp does not implement
            raise InterventionError(f"LatentClamp supports relu, jumprelu and topk SAEs, not {sae.activation!r}; "
                                    "steer along its decoder rows with Steering.from_sae instead")
        if sae.is_transcoder:
            raise InterventionError("LatentClamp needs an autoencoder; a transcoder reads and writes different "
                                    "sites (use steering_from_sae for its decoder directions)")
        target = site or sae.site
        if target is None:
            raise InterventionError("the SAE is not attached to a site: pass site=... (e.g. 'layers.6')")
        idx = [int(latents)] if isinstance(latents, int) else [int(i) for i in latents]
        if not idx or len(set(idx)) != len(idx) or not all(0 <= i < sae.d_sae for i in idx):
            raise InterventionError(f"latents must be distinct indices in [0, {sae.d_sae}), got {idx}")
        vals = [float(values)] * len(idx) if isinstance(values, (int, float)) else [float(v) for v in values]
        if len(vals) != len(idx) or not all(math.isfinite(v) for v in vals):
            raise InterventionError(f"{len(vals)} values for {len(idx)} latents (one finite value each)")
        sel = torch.tensor(idx)
        if sae.activation == "topk":
            enc_w, enc_b = sae.W_enc, sae.b_enc  # membership in the top k needs every latent
        else:
            enc_w, enc_b = sae.W_enc[:, sel], sae.b_enc[sel]
        t = {"enc_w": enc_w, "enc_b": enc_b, "dec_w": sae.W_dec[sel]}
        if sae.apply_b_dec_to_input:
            t["b_dec"] = sae.b_dec
        if sae.threshold is not None:
            t["threshold"] = sae.threshold[sel]
        cfg = {"latents": idx, "values": vals, "activation": sae.activation, "k": sae.k, "d_sae": sae.d_sae,
               "d_in": sae.d_in, "source": sae.source}
        self._init(target, positions, name or f"sae_clamp_{idx[0]}", cfg, t)

    def _init(self, site: str, positions: PositionsSpec, name: str, cfg: dict[str, Any],
              tensors: Mapping[str, torch.Tensor]) -> None:
        Intervention.__init__(self, [site], positions, name)
        self.cfg = dict(cfg)
        # float32 master copies: the clamp's arithmetic runs in float32 whatever the model's dtype
        self._t = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        self._values = torch.tensor(self.cfg["values"], dtype=torch.float32)
        self._sel = torch.tensor(self.cfg["latents"], dtype=torch.long)
        self._sel_on: dict[torch.device, torch.Tensor] = {}

    @property
    def latents(self) -> list[int]:
        return list(self.cfg["latents"])

    @property
    def values(self) -> list[float]:
        return list(self.cfg["values"])

    # ---- the edit ----------------------------------------------------------------------------
    def latent_acts(self, x: torch.Tensor) -> torch.Tensor:
        """The chosen latents' activations ``[..., n_latents]`` for activations ``x`` ``[..., d_in]`` (float32)."""
        t = {k: self.cast(k, v, x.new_empty((), dtype=torch.float32)) for k, v in self._t.items()}
        xf = x.float()
        if "b_dec" in t:
            xf = xf - t["b_dec"]
        pre = xf @ t["enc_w"] + t["enc_b"]
        act = self.cfg["activation"]
        if act == "relu":
            return torch.relu(pre)
        if act == "jumprelu":
            return torch.relu(pre) * (pre > t["threshold"])
        vals, idx = torch.relu(pre).topk(int(self.cfg["k"]), dim=-1, sorted=False)
        dense = torch.zeros_like(pre).scatter_(-1, idx, vals)
        sel = self._sel_on.get(x.device)
        if sel is None:
            sel = self._sel_on[x.device] = self._sel.to(x.device)
        return dense[..., sel]

    def apply(self, site: str, h: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        m = ctx.mask(self.positions, h.device)
        if m is False:
            return h
        flat = h.reshape(*h.shape[:2], -1)  # heads sites arrive as [b, s, n_heads, head_dim]
        z = self.latent_acts(flat)
        like = flat.new_empty((), dtype=torch.float32)
        delta = (self.cast("values", self._values, like) - z) @ self.cast("dec_w", self._t["dec_w"], like)
        new = (flat.float() + delta).to(h.dtype).view_as(h)
        return at_positions(m, new, h)

    # ---- persistence -------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return dict(self.cfg)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._t)

    def expected_shapes(self, sites: Mapping[str, Site]) -> dict[str, tuple[int, ...]]:
        n = len(self.cfg["latents"])
        d_in = int(self.cfg["d_in"])
        width = self.cfg["d_sae"] if self.cfg["activation"] == "topk" else n
        want = {"enc_w": (d_in, width), "enc_b": (width,), "dec_w": (n, d_in)}
        if "b_dec" in self._t:
            want["b_dec"] = (d_in,)
        if "threshold" in self._t:
            want["threshold"] = (n,)
        return want

    def bind(self, sites: Mapping[str, Site]) -> None:
        d_in = int(self.cfg["d_in"])
        for name, s in sites.items():
            shape = s.shape
            width = None if shape is None else int(torch.Size(shape).numel())
            if width is not None and width != d_in:
                raise InterventionError(f"{self.name}: the SAE reads width {d_in}, site {name!r} has width {width}")
        super().bind(sites)
        self.invalidate()

    @classmethod
    def from_saved(cls, sites: list[str], positions: Positions, name: str, params: dict[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> LatentClamp:
        # The constructor's checks, on the saved form: distinct latents in range, one finite value each, a k
        # only (and always) for top-k, and floating, finite tensors of exactly the shapes the clamp uses.
        p = validate(ClampParams, params, InterventionError, None, "params")
        n = len(p.latents)
        if len(set(p.latents)) != n or max(p.latents) >= p.d_sae or len(p.values) != n:
            raise InterventionError(f"sae_clamp {name!r}: params: expected {n} distinct latents below d_sae={p.d_sae} "
                                    f"and one value each, got latents {p.latents[:8]} and {len(p.values)} values")
        if (p.activation == "topk") != (p.k is not None) or (p.k is not None and p.k > p.d_sae):
            raise InterventionError(f"sae_clamp {name!r}: params.k: expected 1 <= k <= d_sae for topk and null "
                                    f"otherwise, got {p.k} for {p.activation}")
        if len(sites) != 1:
            raise InterventionError(f"sae_clamp {name!r}: expected exactly one site, got {sites}")
        width = p.d_sae if p.activation == "topk" else n
        want: dict[str, tuple[int, ...]] = {"enc_w": (p.d_in, width), "enc_b": (width,), "dec_w": (n, p.d_in)}
        if p.activation == "jumprelu":
            want["threshold"] = (n,)
        if "b_dec" in tensors:
            want["b_dec"] = (p.d_in,)
        if set(tensors) != set(want):
            raise InterventionError(f"sae_clamp {name!r}: expected tensors {sorted(want)}, got {sorted(tensors)}")
        for key, shape in want.items():
            check_tensor(tensors[key], InterventionError, None, f"tensor {key!r}", shape)
        params = p.model_dump()
        obj = cls.__new__(cls)
        obj._init(sites[0], positions, name, params, tensors)
        return obj
