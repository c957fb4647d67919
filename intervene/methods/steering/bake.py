"""How steering vectors and directional ablations bake into weights (see :mod:`intervene.bake`).

A baker receives one intervention, its resolved sites and the :class:`WeightEditor`, and either
describes its edit as affine maps at residual locations or raises ``NotBakeableError``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from intervene.bake import require_all_positions
from intervene.bake.editor import WeightEditor
from intervene.bake.layout import Loc, locate
from intervene.errors import NotBakeableError
from intervene.intervention import Intervention
from intervene.sites import Site

# The hooked configurations the residual-stream ablation reproduces (documented in bake/__init__).
ABLATION_SITES_EXAMPLE = '["layers.*:input", "layers.*.attn", "layers.*"]'


def _site_vector(iv: Intervention, concrete: str) -> torch.Tensor:
    """The exact vector the hook adds/uses at ``concrete`` (float32 math, as the hook does)."""
    return iv._vec(concrete, torch.empty(0, dtype=torch.float32)).reshape(-1)  # noqa: SLF001


def bake_steering(iv: Intervention, sites: Mapping[str, Site], editor: WeightEditor) -> None:
    """``h + scale·v`` at a residual point or writer output is a bias; at a writer input (the
    heads site) it is ``b + W (scale·v)``."""
    require_all_positions(iv)
    model = editor.source
    for concrete, site in sites.items():
        editor.add(locate(model, site), _site_vector(iv, concrete), f"{iv.name} at {concrete}")


def bake_directional_ablation(iv: Intervention, sites: Mapping[str, Site], editor: WeightEditor) -> None:
    """Writer outputs and inputs project locally (``W <- P W`` / ``W <- W P``). Residual points
    (``layers.{i}``, ``layers.{i}:input`` for i > 0) are baked by making the whole residual
    stream orthogonal to ``r`` — exact only when the hooked sites already keep every point that
    some module reads free of ``r`` (see :func:`residual_coverage`)."""
    require_all_positions(iv)
    model = editor.source
    located = {c: (s, locate(model, s)) for c, s in sites.items()}
    if not any(loc.kind == "resid" for _, loc in located.values()):
        for concrete, (_, loc) in located.items():
            editor.project(loc, _site_vector(iv, concrete), iv.value, f"{iv.name} at {concrete}")
        return
    why = f"{iv.name} ({iv.type_name})"
    if iv.value is not None:
        raise NotBakeableError(f"{why}: clamping the residual stream to value={iv.value} along r at several "
                               "points is not an orthogonal weight edit; only value=None bakes there")
    dirs = [_site_vector(iv, c) for c in sites]
    r = dirs[0]
    if any(d.shape != r.shape or not torch.allclose(d, r, atol=1e-6) for d in dirs[1:]):
        raise NotBakeableError(f"{why}: a residual-stream ablation bakes only with one direction at all sites")
    if editor.n_interventions > 1:
        raise NotBakeableError(f"{why}: a residual-stream ablation must be baked on its own (its exactness depends "
                               "on which points are projected, which other edits would change)")
    gaps = residual_coverage([loc for _, loc in located.values()], editor)
    if gaps:
        raise NotBakeableError(
            f"{why}: the hooked model leaves r in {', '.join(gaps[:4])}{' ...' if len(gaps) > 4 else ''}, which a "
            f"module reads; orthogonalised weights remove it everywhere, so they would differ. Ablate at every "
            f"point a module reads, e.g. sites={ABLATION_SITES_EXAMPLE}")
    editor.project_residual(r, f"{iv.name} (residual-stream ablation)")


def residual_coverage(locs: list[Loc], editor: WeightEditor) -> list[str]:
    """Points of the residual stream that a module reads but the hooked ablation leaves with a
    component along ``r`` (empty: the orthogonalised weights reproduce the hooks exactly).

    Read points: each block's input, in sequential blocks the MLP's input (the residual after
    attention), and the final norm's input. Ablating a writer's output keeps a point free only
    if the point it adds to was already free.
    """
    n = editor.n_layers
    parallel = editor.layout.is_parallel(editor.model.config)
    embed = any(loc.kind == "embed" for loc in locs)
    resid = {loc.layer for loc in locs if loc.kind == "resid"}
    attn = {loc.layer for loc in locs if loc.kind == "write" and loc.part == "attn"}
    mlp = {loc.layer for loc in locs if loc.kind == "write" and loc.part == "mlp"}
    gaps: list[str] = []
    free = embed
    for i in range(n):
        if not free:
            gaps.append(f"the input of block {i}")
        if parallel:
            free = i in resid or (free and i in attn and i in mlp)
        else:
            mid = free and i in attn
            if not mid:
                gaps.append(f"block {i}'s MLP input")
            free = i in resid or (mid and i in mlp)
    if not free:
        gaps.append("the final norm's input")
    return gaps
