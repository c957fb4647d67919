"""Inference-Time Intervention (Li et al., 2023): shift the most truth-predictive attention heads.

The site is the input of each layer's attention output projection viewed per head
(``layers.{i}.heads``, ``[..., n_heads, head_dim]``; exact under grouped-query attention). For each
selected head ``h`` the edit adds ``α·σ_h·θ̂_h`` to that head's slice and leaves every other head
untouched:

* ``θ̂_h`` — a unit direction: the mass-mean shift ``mean(true) - mean(false)`` (default), the
  probe's weight vector, or a random direction (control);
* ``σ_h`` — the standard deviation (ddof=0, like honest_llama's ``np.std``) of the fitting
  activations projected on ``θ̂_h``;
* ``α`` — the strength (default 15).

Heads are chosen as in the paper: one logistic-regression probe per head on last-token
activations of "Q: {question} A: {answer}" prompts, train/validation split by question, the top
``K`` heads by validation accuracy (see :mod:`intervene.methods.iti.fit`).

What the labels must contrast: true against false *answers*, and the model must have a reason to
represent which is which. The quirky demo model does: it learned from transcripts that a speaker's
earlier answers show whether they judge truthfully, so at every answer token its heads compute
whether that answer is true. Fitted on Alice's prompts alone (each prompt plus each answer, labelled
by the answer's truth), the top heads reach 0.94 validation accuracy and the shift makes Bob judge like
a truthful speaker while Alice's answers stay; the README gives the figures and their CE cost. A model
that never needs to judge an appended answer (the previous demo model) gives chance-level heads and no
effect. :func:`intervene.data.quirky.speaker_contrast` (the same questions asked of Alice, label 1, and
Bob, label 0) is the other contrast the quirky data offer: it finds the heads that carry the speaker.

Saved state is compact: ``params`` hold ``alpha`` and the ``(layer, head)`` list; the tensors are
``direction`` ``[K, head_dim]`` and ``sigma`` ``[K]``. The shift is recomputed in float32 from
them, identically on every load. With ``positions="all"`` the edit bakes exactly into the weights:
``o_proj.bias += W_o·d`` with ``d`` the concatenated per-head shifts (zeros elsewhere).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import torch
from pydantic import Field

from intervene.errors import InterventionError
from intervene.hparams import as_dict, make_config
from intervene.intervention import Intervention
from intervene.methods.iti.config import ITIConfig
from intervene.positions import CallContext, Positions, PositionsSpec, at_positions
from intervene.schemas.base import Index, JSONObject, Strict, pair, validate
from intervene.sites import Site
from intervene.tensorfile import check_tensor

UNIT_TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2}  # saved directions are unit within their dtype's rounding


class ITIParams(Strict):
    """``params`` of a saved ``iti`` intervention."""

    alpha: float = 15.0
    heads: Annotated[list[pair(Index)], Field(min_length=1, max_length=1 << 16)]  # type: ignore[valid-type]
    fit: JSONObject = {}


def _site_of(layer: int) -> str:
    return f"layers.{layer}.heads"


class ITI(Intervention):
    """Add ``alpha * sigma[k] * direction[k]`` to head ``heads[k]`` at the o_proj input.

    Args:
        heads: the selected ``(layer, head)`` pairs, best first when fitted.
        directions: directions ``[K, head_dim]``, normalised here in float32 unless ``normalize=False``
            (used when reloading unit directions, so a round trip keeps their exact bits).
        sigma: ``[K]`` standard deviations of the activations along each direction.
        alpha: strength (a settable property; changing it needs no refit).
        positions: ``"all"`` (default; bakes), ``"generated"``, ``"last"`` or any spec of
            :mod:`intervene.positions`.

    Learned attributes after :meth:`fit`: ``top_heads_`` (= ``heads``), ``directions_`` ``[K, D]``,
    ``sigma_`` ``[K]``, ``head_accuracies_`` ``[L, H]`` (validation accuracy of every head's probe),
    ``train_accuracies_`` ``[L, H]``, ``fit_info_`` (sizes, split, direction kind).
    """

    def __init__(self, heads: Sequence[tuple[int, int]], directions: torch.Tensor, sigma: torch.Tensor,
                 alpha: float = 15.0, positions: PositionsSpec = "all", name: str | None = None,
                 normalize: bool = True) -> None:
        pairs = [(int(layer), int(head)) for layer, head in heads]
        if not pairs:
            raise InterventionError("ITI needs at least one (layer, head)")
        if len(set(pairs)) != len(pairs) or any(v < 0 for p in pairs for v in p):
            raise InterventionError(f"ITI heads must be distinct non-negative (layer, head) pairs, got {pairs}")
        d = torch.as_tensor(directions).detach().float()
        s = torch.as_tensor(sigma).detach().float().reshape(-1)
        if d.ndim != 2 or d.shape[0] != len(pairs) or s.shape[0] != len(pairs):
            raise InterventionError(f"ITI: {len(pairs)} heads need directions [K, head_dim] and sigma [K]; got "
                                    f"{tuple(d.shape)} and {tuple(s.shape)}")
        norm = d.norm(dim=-1, keepdim=True)
        if not bool(torch.isfinite(d).all() & torch.isfinite(s).all()) or bool((norm == 0).any()):
            raise InterventionError("ITI directions must be finite and non-zero, sigma finite")
        if bool((s < 0).any()) or not math.isfinite(float(alpha)):
            raise InterventionError("ITI sigma (a standard deviation) must be non-negative and alpha finite")
        super().__init__(sorted({_site_of(layer) for layer, _ in pairs}, key=lambda n: int(n.split(".")[1])),
                         positions, name)
        self.top_heads_ = pairs
        self.directions_ = d / norm if normalize else d
        self.sigma_ = s
        self._alpha = float(alpha)
        self._full: dict[str, torch.Tensor] = {}  # site -> [H, D] float32 shift, zeros off the selected heads
        self.head_accuracies_: torch.Tensor | None = None
        self.train_accuracies_: torch.Tensor | None = None
        self.fit_info_: dict[str, Any] = {}

    # ---- the edit ------------------------------------------------------------------------------
    @property
    def heads(self) -> list[tuple[int, int]]:
        return list(self.top_heads_)

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = float(value)
        self._full.clear()
        self.invalidate()

    @property
    def shifts(self) -> torch.Tensor:
        """``[K, head_dim]`` float32: ``alpha * sigma[:, None] * directions`` (what each head gets)."""
        return self._alpha * self.sigma_.unsqueeze(-1) * self.directions_

    def layer_shift(self, site: str, n_heads: int) -> torch.Tensor:
        """``[n_heads, head_dim]`` float32 shift at ``site`` (zeros for heads not selected there)."""
        full = self._full.get(site)
        if full is None:
            layer = int(site.split(".")[1])
            full = torch.zeros(n_heads, self.directions_.shape[1])
            shifts = self.shifts
            for k, (lay, head) in enumerate(self.top_heads_):
                if lay == layer:
                    full[head] = shifts[k]
            self._full[site] = full
        return full

    def bind(self, sites: Mapping[str, Site]) -> None:
        want = set(self.sites)
        if set(sites) != want:
            raise InterventionError(f"{self.name}: ITI edits sites {sorted(want)}, got {sorted(sites)}")
        dim = self.directions_.shape[1]
        for name, site in sites.items():
            if site.heads is None:
                raise InterventionError(f"{self.name}: {name!r} is not a per-head site")
            n_heads, head_dim = site.heads
            if head_dim != dim:
                raise InterventionError(f"{self.name}: directions have head_dim {dim}, {name!r} has {head_dim}")
            layer = int(name.split(".")[1])
            bad = [h for lay, h in self.top_heads_ if lay == layer and h >= n_heads]
            if bad:
                raise InterventionError(f"{self.name}: {name!r} has {n_heads} heads; ITI selects head(s) {bad}")
        self._full.clear()
        self.invalidate()

    def _shift_like(self, site: str, h: torch.Tensor) -> torch.Tensor:
        key = (site, h.device, h.dtype)
        out = self._cast_cache.get(key)
        if out is None:
            out = self.layer_shift(site, h.shape[-2]).to(device=h.device, dtype=h.dtype)
            self._cast_cache[key] = out
        return out

    def apply(self, site: str, h: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        """``h`` is ``[batch, seq, n_heads, head_dim]``; adds the layer's shift at the chosen positions."""
        m = ctx.mask(self.positions, h.device)
        if m is False or self._alpha == 0.0:
            return h
        v = self._shift_like(site, h)
        return at_positions(m, h + v, h)

    # ---- persistence ---------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alpha": self._alpha, "heads": [list(p) for p in self.top_heads_]}
        if self.fit_info_:
            out["fit"] = self.fit_info_
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"direction": self.directions_, "sigma": self.sigma_}

    def expected_shapes(self, sites: Mapping[str, Site]) -> dict[str, tuple[int, ...]]:
        dims = {s.heads[1] for s in sites.values() if s.heads is not None}
        k = len(self.top_heads_)
        return {"sigma": (k,)} if len(dims) != 1 else {"direction": (k, dims.pop()), "sigma": (k,)}

    @classmethod
    def from_saved(cls, sites: list[str], positions: Positions, name: str, params: dict[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> ITI:
        # The constructor's checks, plus the format's: floating tensors of shapes [K, head_dim] and [K], and
        # unit directions (they are used as stored: normalising again would move their last bits).
        p = validate(ITIParams, params, InterventionError, None, "params")
        for key in ("direction", "sigma"):
            if key not in tensors:
                raise InterventionError(f"missing tensor {key!r}")
        k = len(p.heads)
        d = check_tensor(tensors["direction"], InterventionError, None, "tensor 'direction'", (k, None))
        check_tensor(tensors["sigma"], InterventionError, None, "tensor 'sigma'", (k,))
        norms = d.double().norm(dim=-1)
        tol = UNIT_TOL.get(d.dtype, 1e-4)
        if not bool(((norms - 1).abs() <= tol).all()):
            raise InterventionError(f"tensor 'direction': expected unit-norm rows (within {tol}), got norms "
                                    f"{[round(float(n), 6) for n in norms[:4]]}")
        iv = cls([(a, b) for a, b in p.heads], d, tensors["sigma"], alpha=p.alpha, positions=positions, name=name,
                 normalize=False)
        if sorted(iv.sites) != sorted(sites):
            raise InterventionError(f"sites {sites} do not match the heads' layers {iv.sites}")
        iv.fit_info_ = dict(p.fit)
        return iv

    # ---- fitting -------------------------------------------------------------------------------
    def top(self, k: int, alpha: float | None = None, name: str | None = None) -> ITI:
        """A new ITI with the first ``k`` heads (the best ``k`` when fitted) and optionally another ``alpha``."""
        if not 0 < k <= len(self.top_heads_):
            raise InterventionError(f"k must be between 1 and {len(self.top_heads_)}, got {k}")
        out = type(self)(self.top_heads_[:k], self.directions_[:k], self.sigma_[:k],
                         self._alpha if alpha is None else alpha, self.positions, name or self.name,
                         normalize=False)
        out.head_accuracies_, out.train_accuracies_ = self.head_accuracies_, self.train_accuracies_
        out.fit_info_ = {**self.fit_info_, "num_heads": k}
        return out

    @classmethod
    def fit(cls, model: Any, tok: Any, data: Sequence[Any] | None, config: ITIConfig | None = None, *,
            batch_size: int = 16, activations: Any = None, name: str | None = None, progress: bool = False,
            **hyperparameters: Any) -> ITI:
        """Fit ITI as in the paper (see the module docstring).

        Args:
            model, tok: a HuggingFace causal LM and its tokenizer (``tok`` unused with ``activations``).
            data: rows in any format of :func:`intervene.methods.iti.fit.build_examples` (TruthfulQA MC
                or generation rows, quirky rows, ``{"text", "label"}`` rows).
            config: an :class:`ITIConfig`; keyword ``hyperparameters`` (``num_heads=8, alpha=1.5``)
                override its fields (or the defaults).
            activations: precomputed last-token head activations of the rendered texts, as
                ``{"layers.{i}.heads": [N, H, D]}`` or a tensor ``[N, L, H, D]``; skips the model.
            batch_size, progress: of the activation pass.

        Probes are trained on the training questions only. Mass-mean directions and σ use every
        rendered row (train and validation), as honest_llama's ``get_com_directions`` and its
        "tuning activations" do; rows you hold out for testing never enter the fit. ``"random"``
        keeps the heads chosen by the probes and only randomises their directions (honest_llama's
        ``use_random_dir`` also randomises the heads), so it isolates the effect of the direction.
        """
        from intervene.methods.iti.fit import (
            as_head_tensor,
            build_examples,
            head_activations,
            head_directions,
            rank_heads,
            split_by_group,
        )
        from intervene.probes.solvers import fit_head_probes

        cfg = make_config(ITIConfig, config, **hyperparameters)
        ex = build_examples(data)
        if activations is not None:
            x = as_head_tensor(activations, len(ex.texts))
        else:
            x = head_activations(model, tok, ex.texts, batch_size=batch_size, progress=progress)
        y = ex.labels
        train, val = split_by_group(ex.groups, cfg.val_fraction, cfg.seed)
        if y[train].unique().numel() < 2:
            raise ValueError("the training questions hold only one label; ITI's probes need both")
        probes = fit_head_probes(x[:, :, train], y[train], C=cfg.C)
        val_acc = probes.accuracy(x[:, :, val], y[val])
        heads = rank_heads(val_acc, cfg.num_heads)
        dirs, sigma = head_directions(x, y, heads, cfg.direction, probes.coef, cfg.seed)  # type: ignore[arg-type]
        iv = cls(heads, dirs, sigma, alpha=cfg.alpha, positions=cfg.positions, name=name)
        iv.head_accuracies_ = val_acc.float()
        iv.train_accuracies_ = probes.accuracy(x[:, :, train], y[train]).float()
        saved = {k: v for k, v in as_dict(cfg).items() if k not in ("alpha", "positions")}  # saved beside
        iv.fit_info_ = {
            **saved, "n_examples": int(y.numel()), "n_train": int(train.numel()), "n_val": int(val.numel()),
            "n_questions": len(set(ex.groups)), "sigma_ddof": 0,
            "val_accuracy": [round(float(val_acc[lay, h]), 6) for lay, h in heads],
        }
        return iv
