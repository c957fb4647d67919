"""Contrast pairs: each (row, template) rendered once with each of two answers.

``x_pos`` carries ``choices[1]`` and ``x_neg`` ``choices[0]``; ``label`` is 1 when the positive side
is the right answer. Rows with more than two choices are binarised elk-style: the right answer
and one wrong answer (chosen by a seeded hash of the question), in a seeded order.

>>> pairs = make_contrast_pairs(quirky_dataset("addition", n=100))   # quirky rows go straight in
>>> pairs.where(character="Alice").x_pos_texts[0]
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from intervene.data.templates import Template, TemplateError, TemplateSpec, get_templates

_SCALAR = (str, int, float, bool, type(None))


@dataclass
class ContrastPairs:
    """N contrast pairs. ``labels`` ``[N]`` int64; spans are each answer's characters in its text.

    ``meta`` holds the scalar fields of the source rows (``character``, ``alice_label``, ...), one
    list of N values per field, so pairs can be filtered and relabelled without the rows.
    """

    x_pos_texts: list[str]
    x_neg_texts: list[str]
    labels: torch.Tensor
    question_ids: list[str]
    template_ids: list[str]
    pos_spans: list[tuple[int, int]] = field(default_factory=list)
    neg_spans: list[tuple[int, int]] = field(default_factory=list)
    meta: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.x_pos_texts)

    def __repr__(self) -> str:
        return (f"ContrastPairs(n={len(self)}, questions={len(set(self.question_ids))}, "
                f"templates={sorted(set(self.template_ids))}, meta={sorted(self.meta)})")

    def column(self, name: str) -> list:
        """A metadata column (N values)."""
        if name not in self.meta:
            raise KeyError(f"no column {name!r}; have {sorted(self.meta)}")
        return self.meta[name]

    def select(self, indices: Iterable[int] | torch.Tensor) -> ContrastPairs:
        """The pairs at ``indices`` (in that order)."""
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]

        def pick(xs: list) -> list:
            return [xs[i] for i in idx]

        return ContrastPairs(pick(self.x_pos_texts), pick(self.x_neg_texts), self.labels[idx].clone(),
                             pick(self.question_ids), pick(self.template_ids),
                             pick(self.pos_spans) if self.pos_spans else [],
                             pick(self.neg_spans) if self.neg_spans else [],
                             {k: pick(v) for k, v in self.meta.items()})

    def where(self, **conditions: Any) -> ContrastPairs:
        """Pairs whose metadata equal every condition, e.g. ``pairs.where(character="Alice")``."""
        for k in conditions:
            self.column(k)
        keep = [i for i in range(len(self)) if all(self.meta[k][i] == v for k, v in conditions.items())]
        return self.select(keep)

    def relabel(self, column: str) -> ContrastPairs:
        """A copy whose labels come from a metadata column (e.g. ``"bob_label"``)."""
        values = self.column(column)
        if any(v not in (0, 1, True, False) for v in values):
            raise ValueError(f"column {column!r} is not binary")
        return replace(self, labels=torch.tensor([int(v) for v in values], dtype=torch.int64))

    @classmethod
    def concat(cls, parts: Sequence[ContrastPairs]) -> ContrastPairs:
        """Pairs of several datasets in one (metadata columns missing from a part are filled with None)."""
        keys = list(dict.fromkeys(k for p in parts for k in p.meta))
        meta = {k: [v for p in parts for v in p.meta.get(k, [None] * len(p))] for k in keys}
        spans_ok = all(p.pos_spans for p in parts)
        return cls([t for p in parts for t in p.x_pos_texts], [t for p in parts for t in p.x_neg_texts],
                   torch.cat([p.labels for p in parts]) if parts else torch.empty(0, dtype=torch.int64),
                   [q for p in parts for q in p.question_ids], [t for p in parts for t in p.template_ids],
                   [s for p in parts for s in p.pos_spans] if spans_ok else [],
                   [s for p in parts for s in p.neg_spans] if spans_ok else [], meta)


def _unit(*parts: object) -> float:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def question_id(row: Mapping, index: int) -> str:
    """A row's question id: ``question_id``, else ``id``, else its index."""
    for key in ("question_id", "id"):
        if row.get(key) is not None:
            return str(row[key])
    return str(index)


def _label(row: Mapping, label_field: str, n_choices: int, i: int) -> int:
    if label_field not in row:
        raise TemplateError(f"row {i} has no {label_field!r} field")
    value = row[label_field]
    try:
        label = int(value)
    except (TypeError, ValueError):
        raise TemplateError(f"row {i}: label {value!r} is not an integer") from None
    if not 0 <= label < n_choices:
        raise TemplateError(f"row {i}: label {label} is out of range for {n_choices} choices")
    return label


def make_contrast_pairs(
    rows: Sequence[Mapping],
    templates: TemplateSpec = None,
    *,
    per_row: str = "all",
    label_field: str = "label",
    seed: int = 0,
) -> ContrastPairs:
    """Render ``rows`` through ``templates`` into contrast pairs.

    Args:
        rows: mappings with the template's fields (``question`` or ``text``), ``label`` (the index of
            the right choice) and optionally ``choices``, ``question_id``, and any metadata.
        templates: see :func:`~intervene.data.templates.get_templates` (default: the rows' own prompt
            and choices when they have them, else the ``"true_false"`` set).
        per_row: ``"all"`` renders every row with every template; ``"one"`` with one template per row,
            chosen by a seeded hash of its question id.
        label_field: the row field holding the right choice's index.
        seed: seeds the template choice and the binarisation of rows with more than two choices.

    Returns:
        :class:`ContrastPairs` with ``len(rows) * len(templates)`` pairs (or ``len(rows)``), in row order.
    """
    if per_row not in ("all", "one"):
        raise ValueError(f"per_row must be 'all' or 'one', got {per_row!r}")
    rows = list(rows)
    temps = get_templates(templates, rows)
    names = [t.name or f"t{i}" for i, t in enumerate(temps)]
    keys = [k for k in (rows[0] if rows else {}) if all(isinstance(r.get(k), _SCALAR) for r in rows)
            and k not in ("text", "question")]
    pos, neg, labels, qids, tids, pspans, nspans = [], [], [], [], [], [], []
    meta: dict[str, list] = {k: [] for k in keys}
    for i, row in enumerate(rows):
        qid = question_id(row, i)
        chosen = range(len(temps)) if per_row == "all" else [int(_unit(seed, "template", qid) * len(temps))]
        for j in chosen:
            template: Template = temps[j]
            choices = template.choices_for(row)
            label = _label(row, label_field, len(choices), i)
            neg_i, pos_i, label = _binarise(choices, label, seed, qid)
            p_text, p_span = template.render(row, choices[pos_i])
            n_text, n_span = template.render(row, choices[neg_i])
            pos.append(p_text)
            neg.append(n_text)
            pspans.append(p_span)
            nspans.append(n_span)
            labels.append(label)
            qids.append(qid)
            own = row.get("template") if template.choices is None and template.name == "row" else None
            tids.append(f"row:{own}" if own is not None else names[j])
            for k in keys:
                meta[k].append(row.get(k))
    return ContrastPairs(pos, neg, torch.tensor(labels, dtype=torch.int64), qids, tids, pspans, nspans, meta)


def _binarise(choices: Sequence[str], label: int, seed: int, qid: str) -> tuple[int, int, int]:
    """``(neg index, pos index, label)``: two choices, the right one among them."""
    if len(choices) == 2:
        return 0, 1, label
    wrong = [k for k in range(len(choices)) if k != label]
    other = wrong[int(_unit(seed, "wrong", qid) * len(wrong))]
    if _unit(seed, "order", qid) < 0.5:
        return other, label, 1
    return label, other, 0
