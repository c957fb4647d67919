"""Which token positions an edit touches, exact under the KV cache, left padding and beam search.

A position is an index into a sequence's *own* tokens: left padding is not counted, and the index
keeps counting across the forward calls of one ``generate`` (prompt first, then each generated
token). Each forward call gets one :class:`CallContext`; interventions ask it for a boolean mask
over the call's ``[batch, seq]`` grid. Masks are computed lazily and cached per spec, so an
intervention that applies everywhere costs no allocation at all.

Specs:

* ``"all"`` — every real (non-pad) token;
* ``"prompt"`` / ``"generated"`` — positions before / from the end of the prompt;
* ``"last"`` — the prompt's last token (in a plain forward: each row's last real token);
* ``[i, j, ...]`` — absolute indices; negative ones count back from the end of the prompt;
* ``[[...], [...], ...]`` or a 2-D tensor — per-example indices (one list per input row; rows
  expanded by beams / ``num_return_sequences`` inherit their example's list).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch

from intervene.errors import PositionsError

PositionsSpec = Union[str, Sequence[int], Sequence[Sequence[int]], torch.Tensor, "Positions", dict]
_NAMED = ("all", "prompt", "generated", "last")
MAX_INDEX = 2**31 - 1  # beyond any sequence a model can hold; larger values are corrupt input


def _index(i: Any) -> int:
    """An int position (``bool`` and floats refused: ``1.9`` is not a token index)."""
    if isinstance(i, torch.Tensor) and i.ndim == 0 and not i.dtype.is_floating_point and i.dtype != torch.bool:
        i = int(i)
    if not isinstance(i, int) or isinstance(i, bool):
        raise PositionsError(f"a position must be an integer, got {i!r}")
    if not -MAX_INDEX <= i <= MAX_INDEX:
        raise PositionsError(f"position {i} is out of range (|i| <= {MAX_INDEX})")
    return i


def _row(r: Any) -> tuple[int, ...]:
    if isinstance(r, torch.Tensor):
        if r.dtype.is_floating_point or r.ndim != 1:
            raise PositionsError("a per-example positions tensor must be a 1-D integer tensor")
        r = r.tolist()
    if isinstance(r, (str, bytes)) or not isinstance(r, Sequence):
        raise PositionsError(f"per-example positions must be lists of integers, got {r!r}")
    return tuple(_index(i) for i in r)


@dataclass(frozen=True)
class Positions:
    """A normalized, hashable positions spec (see the module docstring).

    ``indices`` holds the ints of ``kind="indices"``, or one tuple of ints per example for
    ``kind="per_example"``; it is empty for the named kinds.
    """

    kind: str  # one of _NAMED, "indices", "per_example"
    indices: tuple[Any, ...] = ()

    @classmethod
    def parse(cls, spec: PositionsSpec) -> Positions:
        """Normalise a user's spec (see the module docstring); ``PositionsError`` for anything else."""
        if isinstance(spec, Positions):
            return spec
        if isinstance(spec, str):
            if spec not in _NAMED:
                raise PositionsError(f"unknown positions {spec!r}; use one of {_NAMED}, a list of ints, "
                                     "or one list of ints per example")
            return cls(spec)
        if isinstance(spec, dict):
            if set(spec) != {"per_example"}:
                raise PositionsError(f"a positions object must be {{'per_example': [[...], ...]}}, got keys "
                                     f"{sorted(map(str, spec))}")
            rows = spec["per_example"]
            if not isinstance(rows, (list, tuple)) or not rows:
                raise PositionsError("per-example positions need at least one example")
            return cls("per_example", tuple(_row(r) for r in rows))
        if isinstance(spec, torch.Tensor):
            if spec.dtype.is_floating_point or spec.dtype == torch.bool or spec.ndim not in (1, 2):
                raise PositionsError("a positions tensor must be an integer tensor of shape [k] or [batch, k]")
            spec = spec.tolist()
        if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)) and len(spec) > 0:
            if all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
                return cls("indices", tuple(_index(i) for i in spec))
            if all(isinstance(r, (Sequence, torch.Tensor)) and not isinstance(r, (str, bytes)) for r in spec):
                return cls("per_example", tuple(_row(r) for r in spec))
        raise PositionsError(f"cannot read positions {spec!r}")

    def to_json(self) -> str | list[int] | dict[str, list[list[int]]]:
        """The JSON form a diff stores (``parse`` reads it back)."""
        if self.kind in _NAMED:
            return self.kind
        if self.kind == "indices":
            return list(self.indices)
        return {"per_example": [list(r) for r in self.indices]}

    @classmethod
    def from_json(cls, obj: Any) -> Positions:
        return cls.parse(obj)


_NONE: Literal[False] = False  # mask sentinel: the edit touches nothing in this call


@dataclass
class GenerationState:
    """What one ``generate`` call needs across its forward calls."""

    batch0: int  # rows in the user's input, before beams / num_return_sequences expand it
    prompt_len: torch.Tensor | None = None  # [batch] set by the first forward call
    calls: int = 0  # forward calls so far


class CallContext:
    """Token bookkeeping of one forward call: absolute positions, padding and prompt lengths.

    ``abs_pos`` is ``[batch, seq]`` (index of each token in its row's own sequence), ``valid``
    ``[batch, seq]`` (not padding) or ``None`` when every token is real, ``prompt_len`` ``[batch]``.
    """

    def __init__(self, batch: int, seq: int, attention_mask: torch.Tensor | None, past_len: int,
                 gen: GenerationState | None) -> None:
        self.batch, self.seq = batch, seq
        self._am = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
        self._past = past_len
        self._gen = gen
        self._masks: dict[tuple[Positions, torch.device | None], torch.Tensor | Literal[False] | None] = {}
        self._abs: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None
        self._prompt: torch.Tensor | None = None
        # A one-token call after the prompt inside generate is a cached decode step: its token is
        # a real, generated token in every row. Named specs then need no tensor work at all.
        self.decode_step = gen is not None and gen.calls > 0 and seq == 1
        if gen is not None:
            if gen.prompt_len is None:
                gen.prompt_len = self._row_lengths()
            gen.calls += 1

    def _row_lengths(self) -> torch.Tensor:
        if self._am is not None:
            return self._am.sum(-1)
        return torch.full((self.batch,), self._past + self.seq, dtype=torch.long)

    def _compute(self) -> None:
        if self._am is not None:
            am = self._am
            if am.shape[0] != self.batch or am.shape[1] < self.seq:
                raise PositionsError(f"attention_mask of shape {tuple(am.shape)} does not cover a call of "
                                     f"{self.batch}x{self.seq} tokens")
            tail = am[:, -self.seq:]
            self._abs = am.long().cumsum(-1)[:, -self.seq:] - 1
            valid = tail.bool()
            self._valid = None if bool(valid.all()) else valid
        else:
            self._abs = (torch.arange(self.seq) + self._past).expand(self.batch, self.seq)
        if self._gen is not None:
            assert self._gen.prompt_len is not None  # set by the generate call's first forward
            self._prompt = self._gen.prompt_len.to(self._abs.device)
            if self._prompt.shape[0] != self.batch:
                raise PositionsError("batch size changed inside generate (unsupported decoding strategy)")
        else:
            self._prompt = self._row_lengths().to(self._abs.device)

    @property
    def abs_pos(self) -> torch.Tensor:
        if self._abs is None:
            self._compute()
        assert self._abs is not None
        return self._abs

    @property
    def valid(self) -> torch.Tensor | None:
        if self._abs is None:
            self._compute()
        return self._valid

    @property
    def prompt_len(self) -> torch.Tensor:
        if self._abs is None:
            self._compute()
        assert self._prompt is not None
        return self._prompt

    def example_index(self) -> torch.Tensor:
        """``[batch]`` index of the input example each row comes from (beams share an example)."""
        batch0 = self._gen.batch0 if self._gen is not None else self.batch
        if batch0 <= 0 or self.batch % batch0:
            raise PositionsError(f"cannot map {self.batch} rows onto {batch0} examples")
        return torch.arange(self.batch) // (self.batch // batch0)

    def mask(self, positions: Positions, device: torch.device | None = None) -> torch.Tensor | Literal[False] | None:
        """``None`` (every position), ``False`` (none) or a ``[batch, seq]`` bool tensor."""
        key = (positions, device)
        if key in self._masks:
            return self._masks[key]
        m = self._build(positions)
        if isinstance(m, torch.Tensor):
            if bool(m.all()):
                m = None
            elif not bool(m.any()):
                m = _NONE
            elif device is not None:
                m = m.to(device)
        self._masks[key] = m
        return m

    def _build(self, p: Positions) -> torch.Tensor | Literal[False] | None:
        if self.decode_step and p.kind in _NAMED:
            return None if p.kind in ("all", "generated") else _NONE
        if p.kind == "all":
            return self.valid
        pos, plen = self.abs_pos, self.prompt_len[:, None]
        if p.kind == "prompt":
            m = pos < plen
        elif p.kind == "generated":
            if self._gen is None:
                return _NONE
            m = pos >= plen
        elif p.kind == "last":
            m = pos == plen - 1
        else:
            m = (pos[:, :, None] == self.listed(p)[:, None, :]).any(-1)
        return m if self.valid is None else m & self.valid

    def listed(self, p: Positions) -> torch.Tensor:
        """``[batch, k]`` own-token indices of an ``indices`` / ``per_example`` spec, negative ones resolved
        against each row's prompt length and missing entries (rows with fewer positions) set to ``-1``.

        Column ``j`` is the ``j``-th listed position of the row's example, so values aligned with the list
        (``[n_examples, k, ...]``) can be gathered by it.
        """
        pos, plen = self.abs_pos, self.prompt_len[:, None]
        if p.kind == "indices":
            idx = torch.tensor(p.indices, device=pos.device, dtype=torch.long).expand(self.batch, -1)
            pad = torch.zeros_like(idx, dtype=torch.bool)
        elif p.kind == "per_example":
            idx, pad = self._per_example(p, pos.device)
        else:
            raise PositionsError(f"positions {p.to_json()!r} are not a list of indices")
        idx = torch.where(idx < 0, idx + plen, idx)
        return idx.masked_fill(pad, -1)

    def _per_example(self, p: Positions, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = p.indices
        ex = self.example_index()
        n_examples = self._gen.batch0 if self._gen is not None else self.batch
        if len(rows) != n_examples:
            raise PositionsError(f"per-example positions give {len(rows)} rows for a batch of {n_examples} examples")
        table, pad = _table(p)
        return table[ex].to(device), pad[ex].to(device)


@functools.lru_cache(maxsize=256)
def _table(p: Positions) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n_examples, width]`` indices of per-example positions and where a row has none (built once per spec:
    every layer's hook of every forward asks for the same one)."""
    rows = p.indices
    width = max(1, max(len(r) for r in rows))
    table = torch.zeros(len(rows), width, dtype=torch.long)
    pad = torch.ones(len(rows), width, dtype=torch.bool)
    flat = [(i, j, v) for i, r in enumerate(rows) for j, v in enumerate(r)]
    if flat:
        i, j, v = zip(*flat)
        table[list(i), list(j)] = torch.tensor(v, dtype=torch.long)
        pad[list(i), list(j)] = False
    return table, pad


def expand_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a ``[batch, seq]`` mask so it broadcasts against ``like`` (``[batch, seq, ...]``)."""
    return mask.view(*mask.shape, *([1] * (like.ndim - 2)))


def at_positions(mask: torch.Tensor | None, new: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``new`` where ``mask`` (``[batch, seq]``, from ``CallContext.mask``) is set and ``h`` elsewhere;
    ``new`` itself when ``mask`` is None (every position selected). ``new`` and ``h``: ``[batch, seq, ...]``."""
    return new if mask is None else torch.where(expand_mask(mask, h), new, h)
