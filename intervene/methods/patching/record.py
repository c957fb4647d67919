"""Record full activations at sites during one forward, and map each row's own-token positions to columns.

Interchange, sweeps and tracing need a source run's activations at exactly the sites they patch,
for every token, before the base run: one forward with our own hooks (removed in ``finally``),
nothing else kept. Positions are own-token indices (left padding not counted; negative ones count
back from the row's end), mapped to the padded batch's columns through the attention mask.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from intervene.errors import PositionsError
from intervene.hooks import HookSet, add_input_hook, add_output_hook
from intervene.intervenable import Intervenable
from intervene.sites import Site, resolve_sites

Inputs = Mapping[str, torch.Tensor]


def model_of(target: nn.Module | Intervenable) -> nn.Module:
    return target.model if isinstance(target, Intervenable) else target


def with_position_ids(model: nn.Module, inputs: Inputs) -> dict[str, Any]:
    """``inputs`` plus ``position_ids`` counting real tokens only (as ``generate`` does), unless given.

    Without them a padded row of an absolute-position model (GPT-2, OPT) would read shifted position
    embeddings in a plain forward, so a row's activations would depend on how much it was padded.
    """
    out = dict(inputs)
    mask = out.get("attention_mask")
    if mask is None or "position_ids" in out:
        return out
    try:
        accepts = "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepts = False
    if accepts:
        out["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    return out


def site_view(h: torch.Tensor, site: Site, batch: int, seq: int) -> torch.Tensor:
    """``h`` as ``[batch, seq, *site_shape]`` (OPT's MLP sees flattened tokens; heads are split)."""
    if h.ndim == 2:
        h = h.view(batch, seq, h.shape[-1])
    return h.view(*h.shape[:2], *site.heads) if site.heads is not None else h


class _Recorded(Exception):
    """Raised by the last recording hook to end the forward early (never escapes :func:`record`)."""


@torch.no_grad()
def record(target: nn.Module | Intervenable, inputs: Inputs, sites: str | Sequence[str],
           stop_early: bool = False, **forward_kwargs: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Run ``target`` on ``inputs`` and keep the activations at ``sites``.

    Returns ``({site: [batch, seq, *site_shape]}, model output)``. With an ``Intervenable`` its edits are
    applied (the recorded values are what the edited model computes). Position ids count real tokens
    (:func:`with_position_ids`), so padding does not change what a row computes. ``stop_early`` ends the
    forward once every site has run (the output is then ``None``): a source run needs nothing after them.
    """
    model = model_of(target)
    ids = inputs.get("input_ids")
    ref = ids if ids is not None else inputs["inputs_embeds"]
    batch, seq = int(ref.shape[0]), int(ref.shape[1])
    out: dict[str, torch.Tensor] = {}
    hooks = HookSet()

    resolved = resolve_sites(model, list(sites) if not isinstance(sites, str) else sites)

    def keeper(site: Site):
        def keep(h: torch.Tensor) -> torch.Tensor:
            out[site.name] = site_view(h.detach(), site, batch, seq).clone()
            if stop_early and len(out) == len(resolved):
                raise _Recorded
            return h
        return keep

    result = None
    # An Intervenable is attached for the run and its model called directly: an early stop must not look
    # like a failing edit to it (that detaches it).
    was = target.attached if isinstance(target, Intervenable) else True
    try:
        if isinstance(target, Intervenable):
            target.attach()
        for site in resolved:
            add = add_input_hook if site.side == "input" else add_output_hook
            add(hooks, site.module, keeper(site), site.name)
        result = model(**with_position_ids(model, inputs), **forward_kwargs)
    except _Recorded:
        pass
    finally:
        hooks.remove()
        if not was:
            assert isinstance(target, Intervenable)
            target.detach()
    return out, result


def row_lengths(inputs: Inputs) -> torch.Tensor:
    """``[batch]`` real tokens per row."""
    mask = inputs.get("attention_mask")
    ref = inputs.get("input_ids")
    ref = ref if ref is not None else inputs["inputs_embeds"]
    if mask is None:
        return torch.full((ref.shape[0],), ref.shape[1], dtype=torch.long)
    return mask.long().sum(-1)


def own_positions(positions: Sequence[int] | Sequence[Sequence[int]], lengths: torch.Tensor,
                  what: str = "positions") -> list[list[int]]:
    """Per row, non-negative own-token indices (negative ones count back from the row's end), bounds-checked.

    ``positions`` is one list for every row or one list per row.
    """
    n = int(lengths.shape[0])
    if positions and all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
        rows = [list(positions)] * n  # type: ignore[list-item]
    else:
        rows = [list(r) for r in positions]  # type: ignore[arg-type]
        if len(rows) != n:
            raise PositionsError(f"{what}: {len(rows)} lists of positions for {n} rows")
    out = []
    for i, (row, length) in enumerate(zip(rows, lengths.tolist())):
        resolved = []
        for p in row:
            if not isinstance(p, int) or isinstance(p, bool):
                raise PositionsError(f"{what}: row {i} has a non-integer position {p!r}")
            q = p + length if p < 0 else p
            if not 0 <= q < length:
                raise PositionsError(f"{what}: position {p} is outside row {i}'s {length} tokens")
            resolved.append(q)
        out.append(resolved)
    return out


def columns(inputs: Inputs, own: list[list[int]]) -> list[list[int]]:
    """The padded-batch column of each own-token index (left or right padding alike)."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return own
    cols = []
    for i, row in enumerate(own):
        real = mask[i].nonzero().flatten().tolist()
        cols.append([real[q] for q in row])
    return cols


def gather(acts: torch.Tensor, cols: list[list[int]]) -> torch.Tensor:
    """``[batch, k, *site]`` values at the given columns (rows with fewer positions are zero-padded)."""
    k = max((len(c) for c in cols), default=0)
    out = acts.new_zeros(acts.shape[0], max(k, 1), *acts.shape[2:])
    for i, c in enumerate(cols):
        if c:
            out[i, : len(c)] = acts[i, c]
    return out
