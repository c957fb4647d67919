"""LoReFT / DiReFT bake exactly where they are affine maps of a linear layer's input or output.

At positions ``"all"`` a ReFT is ``h ↦ M·h + c`` with ``M = I − L·R`` of rank ``r`` (:meth:`low_rank`). At
``layers.{i}.heads`` (the input of the attention output projection) that folds into the projection,
``W ← W·M, b ← b + W·c``; at ``layers.{i}.attn`` / ``.mlp`` (what a writer adds to the residual) into the
writer, ``W ← M·W, b ← M·b + c`` (a bias is created through the family's config flag when ``c ≠ 0``). The residual stream itself (``layers.{i}``,
``layers.{i}:input``) carries ``h`` past every weight through the skip connections, so a matrix there is refused,
as are other positions (weights act on every token alike) and post-norm writers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from intervene.bake import require_all_positions
from intervene.bake.layout import locate
from intervene.errors import InterventionError, NotBakeableError
from intervene.intervention import Intervention
from intervene.sites import Site


def bake_reft(iv: Intervention, sites: Mapping[str, Site], editor: Any) -> None:
    """Describe a LoReFT / DiReFT as an affine map of a linear layer's input or output to the WeightEditor."""
    low_rank = getattr(iv, "low_rank", None)
    if low_rank is None:
        raise InterventionError(f"bake_reft bakes LoReFT / DiReFT, not {type(iv).__name__}")
    require_all_positions(iv)
    for concrete, site in sites.items():
        loc = locate(editor.source, site)
        why = f"{iv.name} ({iv.type_name}) at {concrete}"
        if loc.kind in ("resid", "embed"):
            raise NotBakeableError(
                f"{why}: a matrix edit of the residual stream is not a weight edit (the skip connections carry h "
                "past every weight); put the ReFT at layers.{i}.heads, .attn or .mlp to bake it")
        left, right, c = low_rank()
        editor.low_rank(loc, left, right, c, why)
