"""The source side of an interchange: one source forward that stops right after the site.

:func:`source_patch` returns the per-example :class:`~intervene.methods.patching.Patch` that
``intervene.methods.patching.interchange_patch`` returns for one site (the same values, positions and
alignment, tested equal), but its source forward ends as soon as the site has run: the later blocks and the LM
head, which a DAS never reads, cost nothing. In training that is most of a step's second forward.
Positions are own-token indices (left padding not counted; negative ones count back from the row's end),
one list for every row or one per row; base and source lists pair element by element.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from intervene.errors import InterventionError, PositionsError
from intervene.hooks import HookSet, add_input_hook, add_output_hook
from intervene.methods.patching import Patch
from intervene.sites import Site
from intervene.training import model_inputs

PositionList = Sequence[int] | Sequence[Sequence[int]]


class _Stop(Exception):
    """Raised by the capture hook to end the source forward after the site."""


def own_positions(positions: PositionList, mask: torch.Tensor, what: str) -> list[list[int]]:
    """Per row, non-negative own-token indices, bounds-checked against each row's real tokens."""
    lengths = mask.long().sum(-1).tolist()
    rows: list[list[int]]
    if positions and all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
        rows = [[int(p) for p in positions]] * len(lengths)  # type: ignore[arg-type]
    else:
        rows = [[int(p) for p in r] for r in positions]  # type: ignore[union-attr]
        if len(rows) != len(lengths):
            raise PositionsError(f"{what}: {len(rows)} lists of positions for {len(lengths)} rows")
    out = []
    for i, (row, n) in enumerate(zip(rows, lengths)):
        got = [p + n if p < 0 else p for p in row]
        if any(not 0 <= q < n for q in got):
            raise PositionsError(f"{what}: positions {row} fall outside row {i}'s {n} tokens")
        out.append(got)
    return out


@torch.no_grad()
def record_at(model: nn.Module, inputs: Mapping[str, torch.Tensor], site: Site) -> torch.Tensor:
    """``[batch, seq, *site_shape]``: the site's activation in a forward of ``inputs`` stopped right after it."""
    batch, seq = inputs["input_ids"].shape
    got: list[torch.Tensor] = []

    def capture(h: torch.Tensor) -> torch.Tensor:
        x = h.view(batch, seq, -1) if h.ndim == 2 else h
        got.append(x.view(*x.shape[:2], *site.heads) if site.heads is not None else x)
        raise _Stop

    hooks = HookSet()
    (add_input_hook if site.side == "input" else add_output_hook)(hooks, site.module, capture, site.name)
    try:
        model(**model_inputs(model, inputs), use_cache=False)
    except _Stop:
        pass
    finally:
        hooks.remove()
    if not got:
        raise InterventionError(f"site {site.name!r} did not run in the source forward")
    return got[0]


def source_patch(model: nn.Module, base: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], site: Site,
                 positions: PositionList, source_positions: PositionList | None = None,
                 name: str = "interchange") -> Patch:
    """The Patch that puts ``source``'s activations at ``site`` into ``base`` (see the module docstring)."""
    b_mask = base.get("attention_mask", torch.ones_like(base["input_ids"]))
    s_mask = source.get("attention_mask", torch.ones_like(source["input_ids"]))
    if b_mask.shape[0] != s_mask.shape[0]:
        raise InterventionError(f"interchange: base has {b_mask.shape[0]} rows, source has {s_mask.shape[0]}")
    base_own = own_positions(positions, b_mask, "positions")
    src_own = own_positions(positions if source_positions is None else source_positions, s_mask, "source_positions")
    if any(len(a) != len(b) for a, b in zip(base_own, src_own)):
        raise InterventionError("interchange: base and source rows list different numbers of positions")
    acts = record_at(model, {"input_ids": source["input_ids"], "attention_mask": s_mask}, site)
    k = max(len(r) for r in src_own)
    values = acts.new_zeros(acts.shape[0], max(k, 1), *acts.shape[2:])
    for i, row in enumerate(src_own):
        real = s_mask[i].nonzero().flatten().tolist()  # own index -> padded column
        values[i, :len(row)] = acts[i, [real[q] for q in row]]
    return Patch({site.name: values}, positions={"per_example": base_own}, name=name, per_example=True)
