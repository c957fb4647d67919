"""One conformance entry per registered intervention type: how to build a non-trivial instance on a
model, its identity setting (or why it has none), and per-call state it needs (REMEDI's edit).

Adding an intervention type means adding its entry here; the suite fails for a registered built-in
type without one (docs/architecture.md, "Adding a method").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

import intervene as iv
from intervene.features.sae import SAE
from intervene.intervention import Intervention
from intervene.sites import hidden_size, resolve_site
from intervene.training import random_orthonormal

Build = Callable[[nn.Module, str], Intervention]  # (model, positions spec name) -> a fresh instance


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _vec(model: nn.Module, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(hidden_size(model), generator=_gen(seed)) * scale


def steering(model: nn.Module, positions: str, scale: float = 2.0) -> Intervention:
    heads = resolve_site(model, "layers.0.heads").heads
    assert heads is not None
    return iv.Steering({"layers.1": _vec(model, 1.0, 1),
                        "layers.0.heads": torch.randn(*heads, generator=_gen(2))}, scale=scale, positions=positions)


def directional_ablation(model: nn.Module, positions: str) -> Intervention:
    return iv.DirectionalAblation({"layers.1.attn": _vec(model, 1.0, 3), "layers.0.mlp": _vec(model, 1.0, 4)},
                                  positions=positions)


def iti(model: nn.Module, positions: str, alpha: float = 3.0) -> Intervention:
    heads = resolve_site(model, "layers.1.heads").heads
    assert heads is not None
    n_heads, head_dim = heads
    picks = [(0, 0), (1, n_heads - 1), (1, 1)]
    return iv.ITI(picks, torch.randn(3, head_dim, generator=_gen(5)), torch.rand(3, generator=_gen(6)) + 0.5,
                  alpha=alpha, positions=positions)


def remedi(model: nn.Module, positions: str, alpha: float = 2.0) -> Intervention:
    r = iv.Remedi(0, hidden_size(model), rank=4, alpha=alpha)  # layer 0: later positions read the edit
    with torch.no_grad():
        for p in r.editor.parameters():
            p.copy_(torch.randn(p.shape, generator=_gen(7)) * 0.3)
    return r


def sae_clamp(model: nn.Module, positions: str) -> Intervention:
    d, n = hidden_size(model), 24
    g = _gen(8)
    sae = SAE(torch.randn(d, n, generator=g) / d ** 0.5, torch.randn(n, generator=g) * 0.1,
              torch.randn(n, d, generator=g) / n ** 0.5, torch.randn(d, generator=g) * 0.1, site="layers.1")
    return iv.LatentClamp(sae, latents=[1, 5, 9], values=[3.0, 0.0, 1.5], positions=positions)


def patch(model: nn.Module, positions: str) -> Intervention:
    heads = resolve_site(model, "layers.0.heads").heads
    assert heads is not None
    return iv.Patch({"layers.0.heads": torch.randn(*heads, generator=_gen(10)),
                     "layers.1.heads": torch.randn(*heads, generator=_gen(11))}, positions=positions, heads=[1])


def noise(model: nn.Module, positions: str, scale: float = 0.5) -> Intervention:
    return iv.Noise(["layers.0", "layers.1.attn"], scale=scale, positions=positions, seed=12)


def das(model: nn.Module, positions: str, k: int = 3) -> Intervention:
    """At ``layers.0`` (later positions read it) with a random rotation; the source comes per call (:func:`das_state`)."""
    n = hidden_size(model)
    return iv.DAS("layers.0", n, k, rotation=random_orthonormal(n, n, _gen(13)))


def boundless_das(model: nn.Module, positions: str, boundary: float = 0.3, temperature: float = 0.5) -> Intervention:
    n = hidden_size(model)
    return iv.BoundlessDAS("layers.0", n, rotation=random_orthonormal(n, n, _gen(14)), boundary=boundary,
                           temperature=temperature)


def _width(model: nn.Module, site: str) -> int:
    shape = resolve_site(model, site).shape
    assert shape is not None
    return int(torch.Size(shape).numel())


def loreft(model: nn.Module, positions: str, identity: bool = False) -> Intervention:
    """At the heads of block 0 (an input of a linear layer: bakes at positions "all")."""
    w, r = _width(model, "layers.0.heads"), 3
    g = _gen(15)
    rot = random_orthonormal(w, r, g)
    x = iv.LoReFT("layers.0.heads", w, r, positions=positions, rotation=rot,
                  weight=None if identity else torch.randn(r, w, generator=g) * 0.5,
                  bias=None if identity else torch.randn(r, generator=g))
    return x


def direft(model: nn.Module, positions: str, identity: bool = False) -> Intervention:
    """At what block 1's attention writes (an output of a linear layer)."""
    w, r = hidden_size(model), 3
    g = _gen(16)
    return iv.DiReFT("layers.1.attn", w, r, positions=positions, down_weight=torch.randn(r, w, generator=g) * 0.5,
                     down_bias=torch.randn(r, generator=g),
                     up_weight=None if identity else torch.randn(w, r, generator=g) * 0.5)


@contextlib.contextmanager
def das_state(intervention: Intervention, batch: dict[str, torch.Tensor]) -> Iterator[None]:
    """A DAS interchanges with a source run per call: here seeded source values at own-token index 1 of each row
    (the same for a reloaded DAS), given as the per-example Patch the patching package builds."""
    assert isinstance(intervention, iv.DAS)
    n = batch["input_ids"].shape[0]
    values = torch.randn(n, 1, intervention.width, generator=_gen(17)) * 2.0
    patch = iv.Patch({intervention.site: values}, positions={"per_example": [[1]] * n}, per_example=True)
    with intervention.interchanging(patch):
        yield


def concept_erasure(model: nn.Module, positions: str, constant: bool = False) -> Intervention:
    """A LEACE eraser fitted (by concept-erasure) on synthetic o_proj inputs whose two classes differ in mean;
    ``constant=True`` fits it on one class only, so there is nothing to erase: L = R = 0, the identity."""
    from concept_erasure import LeaceFitter

    heads = resolve_site(model, "layers.1.heads").heads
    assert heads is not None
    d, g = heads[0] * heads[1], _gen(13)
    y = torch.zeros(64, dtype=torch.long) if constant else torch.arange(64) % 2
    x = torch.randn(64, d, generator=g) + torch.randn(d, generator=g) + y[:, None] * 3 * torch.randn(d, generator=g)
    eraser = LeaceFitter.fit(x, torch.nn.functional.one_hot(y).float()).eraser
    return iv.ConceptErasure(eraser, sites="layers.1.heads", positions=positions)


@contextlib.contextmanager
def remedi_state(intervention: Intervention, batch: dict[str, torch.Tensor]) -> Iterator[None]:
    """REMEDI edits per call: directions from its editor (so a reloaded editor gives the same ones), at
    one prompt token per row (own-token index 1: the second real token)."""
    assert isinstance(intervention, iv.Remedi)
    n = batch["input_ids"].shape[0]
    attr = torch.randn(n, intervention.hidden_size, generator=_gen(9))
    p = next(intervention.editor.parameters())
    with torch.no_grad():
        d = intervention.editor(attr.to(p.dtype))
    with intervention.editing_with(d, [1] * n, prompt_only=True):
        yield


@dataclass(frozen=True)
class Case:
    """How the suite exercises one type."""

    build: Build
    identity: Build | None = None  # the type's "does nothing" setting
    no_identity: str = ""  # why the type has none
    state: Callable[[Intervention, dict[str, torch.Tensor]], contextlib.AbstractContextManager] | None = None
    generated: bool = True  # supports positions="generated" (else the KV-cache check uses its own positions)


CASES: dict[str, Case] = {
    "steering": Case(steering, identity=lambda m, p: steering(m, p, scale=0.0)),
    "directional_ablation": Case(directional_ablation,
                                 no_identity="removing a component along a non-zero direction always changes h"),
    "iti": Case(iti, identity=lambda m, p: iti(m, p, alpha=0.0)),
    "remedi": Case(remedi, identity=lambda m, p: remedi(m, p, alpha=0.0), state=remedi_state, generated=False),
    "sae_clamp": Case(sae_clamp, no_identity="a clamp sets latents to constants, which no setting makes the identity"),
    "patch": Case(patch, no_identity="a patch sets activations to given values, which no constant makes the identity"),
    "noise": Case(noise, identity=lambda m, p: noise(m, p, scale=0.0)),
    "das": Case(das, identity=lambda m, p: das(m, p, k=0), state=das_state, generated=False),
    "boundless_das": Case(boundless_das, identity=lambda m, p: boundless_das(m, p, boundary=0.0, temperature=1e-3),
                          state=das_state, generated=False),
    "loreft": Case(loreft, identity=lambda m, p: loreft(m, p, identity=True)),
    "direft": Case(direft, identity=lambda m, p: direft(m, p, identity=True)),
    "concept_erasure": Case(concept_erasure, identity=lambda m, p: concept_erasure(m, p, constant=True)),
}
