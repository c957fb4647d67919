"""Interchange interventions in one call: run the source, record the sites, run the base with the patch.

>>> out = interchange(model, base, source, sites="layers.3", positions=[-1])          # logits of the base run
>>> gen = interchange(model, base, source, sites="layers.3", positions=[-1], generate={"max_new_tokens": 8})

``base`` and ``source`` are tokenizer outputs (``input_ids``, ``attention_mask``) with the same number
of rows, padded left or right, of different lengths. Row ``i``'s ``source_positions`` map element by
element onto its ``positions`` (own-token indices; negative ones count from the row's end), so the
same template at different lengths lines up by its anchors (e.g. ``[-1]``: the last token). The
result is what two runs and a hand-written hook would give (tested to 1e-6 in float32), under
``generate`` too: the patch sits in the prompt and the KV cache carries it. Both runs count position
ids over real tokens only, as ``generate`` does, so padding never shifts what a row computes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from intervene.errors import InterventionError
from intervene.intervenable import Intervenable
from intervene.intervention import Intervention
from intervene.methods.patching.intervention import Patch
from intervene.methods.patching.record import (
    Inputs,
    columns,
    gather,
    model_of,
    own_positions,
    record,
    row_lengths,
    with_position_ids,
)
from intervene.sites import expand_sites

PositionList = Sequence[int] | Sequence[Sequence[int]]


def source_values(target: nn.Module | Intervenable, source: Inputs, sites: Sequence[str],
                  source_positions: PositionList) -> dict[str, torch.Tensor]:
    """``{site: [batch, k, *site_shape]}``: the source run's activations at each row's source positions."""
    acts, _ = record(target, source, sites, stop_early=True, use_cache=False)
    cols = columns(source, own_positions(source_positions, row_lengths(source), "source_positions"))
    return {s: gather(a, cols) for s, a in acts.items()}


def interchange_patch(target: nn.Module | Intervenable, base: Inputs, source: Inputs, sites: str | Sequence[str],
                      positions: PositionList = (-1,), source_positions: PositionList | None = None,
                      heads: Sequence[int] | None = None, directions: torch.Tensor | None = None,
                      name: str = "interchange") -> Patch:
    """The :class:`Patch` that puts ``source``'s activations into ``base`` (see the module docstring)."""
    model = model_of(target)
    names = expand_sites(model, sites)
    b_rows, s_rows = _rows(base), _rows(source)
    if b_rows != s_rows:
        raise InterventionError(f"interchange: base has {b_rows} rows, source has {s_rows}")
    base_own = own_positions(positions, row_lengths(base), "positions")
    src_own = own_positions(positions if source_positions is None else source_positions, row_lengths(source),
                            "source_positions")
    bad = [i for i, (a, b) in enumerate(zip(base_own, src_own)) if len(a) != len(b)]
    if bad:
        raise InterventionError(f"interchange: rows {bad[:5]} list {len(base_own[bad[0]])} base and "
                                f"{len(src_own[bad[0]])} source positions; they pair element by element")
    values = source_values(target, source, names, src_own)
    return Patch(values, positions={"per_example": base_own}, name=name, per_example=True, heads=heads,
                 directions=directions)


def interchange(target: nn.Module | Intervenable, base: Inputs, source: Inputs, sites: str | Sequence[str],
                positions: PositionList = (-1,), source_positions: PositionList | None = None, *,
                heads: Sequence[int] | None = None, directions: torch.Tensor | None = None,
                generate: Mapping[str, Any] | None = None, **forward_kwargs: Any) -> Any:
    """Run ``source``, then ``base`` with the source's activations patched in; returns the base run's output.

    Args:
        target: a model, or an ``Intervenable`` whose edits apply to both runs.
        base, source: tokenizer outputs with the same number of rows.
        sites: site names or wildcards (``layers.3``, ``layers.*.attn``, ``layers.2.heads``).
        positions: base positions, one list for all rows or one per row (own-token indices).
        source_positions: the matching source positions (default: ``positions``).
        heads: patch only these heads (``.heads`` sites); directions: ``[k, width]``, patch only their span.
        generate: ``model.generate`` keyword arguments: generate from the patched base instead of one forward.
        forward_kwargs: passed to the base forward (e.g. ``use_cache=False``).
    """
    patch = interchange_patch(target, base, source, sites, positions, source_positions, heads, directions)
    with attached_with(target, [patch]) as ivm:
        if generate is not None:  # generate derives position ids from the mask itself
            return ivm.generate(**{k: v for k, v in base.items() if k != "position_ids"}, **dict(generate))
        return ivm(**with_position_ids(model_of(target), base), **forward_kwargs)


def _rows(inputs: Inputs) -> int:
    ref = inputs.get("input_ids")
    return int((ref if ref is not None else inputs["inputs_embeds"]).shape[0])


class attached_with:
    """Context manager: an attached Intervenable with ``patches`` added last (after the target's own edits);
    the target's interventions and attachment come back as they were."""

    def __init__(self, target: nn.Module | Intervenable, patches: Sequence[Intervention]) -> None:
        self.target, self.patches = target, list(patches)
        self.ivm: Intervenable | None = None
        self.was_attached = False

    def __enter__(self) -> Intervenable:
        if isinstance(self.target, Intervenable):
            self.was_attached = self.target.attached
            self.target.detach()
            self.target.interventions.extend(self.patches)
            self.ivm = self.target
        else:
            self.ivm = Intervenable(self.target, self.patches, attach=False)
        try:
            return self.ivm.attach()
        except BaseException:
            self._restore()
            raise

    def _restore(self) -> None:
        assert self.ivm is not None
        self.ivm.detach()
        if isinstance(self.target, Intervenable):
            for p in self.patches:
                self.target.interventions.remove(p)
            if self.was_attached:
                self.target.attach()

    def __exit__(self, *exc: object) -> None:
        self._restore()
