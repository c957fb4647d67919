"""ITI bakes exactly: the hook adds ``d`` (the layer's per-head shifts, zeros elsewhere) to o_proj's input,
so the weights get ``o_proj.bias += W_o·d`` (a bias is created where the family has a config flag for it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from intervene.bake import require_all_positions
from intervene.bake.layout import locate
from intervene.errors import InterventionError
from intervene.intervention import Intervention
from intervene.methods.iti.intervention import ITI
from intervene.sites import Site


def bake_iti(iv: Intervention, sites: Mapping[str, Site], editor: Any) -> None:
    """Describe ``iv``'s shifts as o_proj biases to the :class:`~intervene.bake.WeightEditor`."""
    if not isinstance(iv, ITI):
        raise InterventionError(f"bake_iti bakes ITI interventions, not {type(iv).__name__}")
    require_all_positions(iv)
    for concrete, site in sites.items():
        assert site.heads is not None  # bind() checked that every ITI site is a per-head site
        editor.add(locate(editor.source, site), iv.layer_shift(concrete, site.heads[0]).reshape(-1),
                   f"{iv.name} at {concrete}")
