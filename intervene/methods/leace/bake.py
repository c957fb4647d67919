"""ConceptErasure bakes exactly where its site is the input or output of one linear layer.

At the input of a linear map ``y = W x + b`` (``layers.{i}.heads``: o_proj's input) the eraser
``x ↦ (I - L R) x + L R μ`` folds as ``W ← W (I - L R)``, ``b ← b + W L R μ``; at a writer's output
(``layers.{i}.attn`` / ``.mlp`` of a pre-norm family) as ``W ← (I - L R) W``, ``b ← (I - L R) b + L R μ``.
The constant needs a bias, created through the family's config flag (``attention_bias`` on Llama);
a non-affine eraser needs none. At a residual point (``layers.{i}``) the skip connection carries the
activation past every writer, so no weight edit reproduces the projection: refused, with that reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from intervene.bake import require_all_positions
from intervene.bake.layout import locate
from intervene.errors import InterventionError
from intervene.intervention import Intervention
from intervene.methods.leace.intervention import ConceptErasure
from intervene.sites import Site


def bake_concept_erasure(iv: Intervention, sites: Mapping[str, Site], editor: Any) -> None:
    """Describe each site's eraser to the :class:`~intervene.bake.WeightEditor` (refusals come before any copy)."""
    if not isinstance(iv, ConceptErasure):
        raise InterventionError(f"bake_concept_erasure bakes ConceptErasure interventions, not {type(iv).__name__}")
    require_all_positions(iv)
    for concrete, site in sites.items():
        left, right, bias = iv.eraser(concrete)
        editor.erase(locate(editor.source, site), left, right, bias, f"{iv.name} ({iv.type_name}) at {concrete}")
