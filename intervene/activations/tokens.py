"""Tokenization, positions and padding for :func:`~intervene.activations.collect`.

Everything here is about mapping an example's *own* token indices (padding removed) to positions
in a padded batch, so the hooks can gather exactly the tokens asked for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from intervene.errors import PositionsError

# "last" | "mean" | "all" | an index | a list of indices (absolute in each text; negative: from the end)
CollectPositions = str | int | Sequence[int]
# per-text (start_char, end_char) pairs, a row field holding one, or a callable row/text -> pair
SpanSpec = Sequence[tuple[int, int]] | str | Callable[[Any], tuple[int, int]] | None


_TOKENIZE_CHUNK = 1024


@dataclass(frozen=True)
class PositionSpec:
    """A parsed positions argument: ``kind`` is ``index`` (``indices`` given), ``mean`` or ``all``."""

    kind: Literal["index", "mean", "all"]
    indices: tuple[int, ...] = ()
    squeeze: bool = False  # one index given as "last" or an int: [N, D] instead of [N, 1, D]
    name: Any = "last"  # the user's spec, JSON-able, for the cache index and Activations.positions

    @classmethod
    def parse(cls, positions: CollectPositions) -> PositionSpec:
        if isinstance(positions, str):
            if positions == "last":
                return cls("index", (-1,), True, "last")
            if positions in ("mean", "all"):
                return cls(positions, name=positions)  # type: ignore[arg-type]
            raise PositionsError(f"unknown positions {positions!r} for collect; use 'last', 'mean', 'all', "
                                 "a token index, or a list of token indices")
        if isinstance(positions, int) and not isinstance(positions, bool):
            return cls("index", (positions,), True, positions)
        if isinstance(positions, torch.Tensor):
            positions = positions.tolist()
        if (isinstance(positions, Sequence) and positions
                and all(isinstance(i, int) and not isinstance(i, bool) for i in positions)):
            return cls("index", tuple(positions), False, list(positions))
        raise PositionsError(f"cannot read positions {positions!r}; use 'last', 'mean', 'all', an int, or a "
                             "non-empty list of ints")


@dataclass
class Encoded:
    """Token ids of every text (flat, compact), and per text what to take: ``index`` or token ``ranges``."""

    flat: torch.Tensor  # [total_tokens] int64: every text's ids, concatenated
    starts: torch.Tensor  # [N+1] int64: text i is flat[starts[i]:starts[i+1]]
    index: torch.Tensor | None  # [N, k] own (unpadded) indices, non-negative
    ranges: torch.Tensor | None  # [N, 2] token range [lo, hi) for "mean" / "all"

    @property
    def lengths(self) -> torch.Tensor:
        return self.starts.diff()

    def ids(self, i: int) -> torch.Tensor:
        return self.flat[int(self.starts[i]): int(self.starts[i + 1])]

    def digest(self) -> str:
        """sha256 of the token ids and the selection: the data part of the cache key."""
        h = hashlib.sha256()
        for t in (self.starts, self.flat, self.index, self.ranges):
            h.update(b"|" if t is None else t.numpy().tobytes())
        return h.hexdigest()


def _char_span(span: SpanSpec, i: int, text: str, row: Mapping | None) -> tuple[int, int]:
    if isinstance(span, str):
        if row is None or span not in row:
            raise PositionsError(f"span={span!r} names a row field, but example {i} has no such field")
        value = row[span]
    elif callable(span):
        value = span(row if row is not None else text)
    else:
        value = span[i]
    try:
        start, end = (int(v) for v in value)
    except (TypeError, ValueError):
        raise PositionsError(f"the span of example {i} must be (start_char, end_char), got {value!r}") from None
    return start, end


def encode(tok: Any, texts: Sequence[str], spec: PositionSpec, rows: Sequence[Mapping] | None = None,
           span: SpanSpec = None, max_length: int | None = None) -> Encoded:
    """Tokenize ``texts`` (no padding) and resolve ``spec``/``span`` into per-text token indices."""
    if span is not None and spec.kind != "mean":
        raise PositionsError("span= selects the tokens to average; use it with positions='mean'")
    if span is not None and not isinstance(span, (str, Mapping)) and not callable(span) and len(span) != len(texts):
        raise PositionsError(f"span gives {len(span)} (start, end) pairs for {len(texts)} texts")
    need_offsets = span is not None
    kwargs: dict[str, Any] = {"add_special_tokens": True}
    if max_length is not None:
        kwargs.update(truncation=True, max_length=max_length)
    if need_offsets:
        if not getattr(tok, "is_fast", False):
            raise PositionsError(f"positions='mean' with a character span needs a fast tokenizer with an offset "
                                 f"mapping; {type(tok).__name__} has none")
        kwargs["return_offsets_mapping"] = True
    n = len(texts)
    chunks: list[torch.Tensor] = []
    lengths = torch.empty(n, dtype=torch.int64)
    ranges = torch.zeros(n, 2, dtype=torch.int64)
    # Tokenize in chunks: the tokenizer's per-text objects (offsets, strings) are large, and keeping
    # only flat int64 ids bounds collect's memory for big N.
    for lo in range(0, n, _TOKENIZE_CHUNK):
        part = list(texts[lo: lo + _TOKENIZE_CHUNK])
        try:
            enc = tok(part, **kwargs)
        except NotImplementedError as e:  # slow tokenizers refuse return_offsets_mapping
            raise PositionsError(f"{type(tok).__name__} cannot return an offset mapping for span positions: "
                                 f"{e}") from None
        part_ids: list[torch.Tensor] = []
        for r, x in enumerate(enc["input_ids"]):
            i = lo + r
            if len(x) == 0:
                raise PositionsError(f"text {i} ({texts[i][:40]!r}) has no tokens")
            part_ids.append(torch.as_tensor(x, dtype=torch.int64))
            lengths[i] = len(x)
            ranges[i, 1] = len(x)
            if need_offsets:
                start, end = _char_span(span, i, texts[i], None if rows is None else rows[i])
                hit = [t for t, (a, b) in enumerate(enc["offset_mapping"][r]) if b > a and a < end and b > start]
                if not hit:
                    raise PositionsError(f"the span ({start}, {end}) of text {i} covers no token: "
                                         f"{texts[i][max(0, start):end]!r} in {texts[i][:60]!r}")
                ranges[i, 0], ranges[i, 1] = hit[0], hit[-1] + 1
        chunks.append(torch.cat(part_ids) if part_ids else torch.empty(0, dtype=torch.int64))
    flat = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    if spec.kind != "index":
        return Encoded(flat, starts, None, ranges)
    want = torch.tensor(spec.indices, dtype=torch.int64)
    index = torch.where(want[None] < 0, want[None] + lengths[:, None], want[None].expand(n, -1))
    bad = (index < 0) | (index >= lengths[:, None])
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise PositionsError(f"position {spec.indices[j]} is out of range for text {i}, which has "
                             f"{int(lengths[i])} tokens")
    return Encoded(flat, starts, index, None)


@dataclass
class Batch:
    """One padded batch and how to read the requested positions out of ``[B, S, ...]`` activations."""

    inputs: dict[str, torch.Tensor]
    size: int
    seq: int
    lengths: torch.Tensor  # [B] tokens per row
    gather: torch.Tensor | None = None  # [B, k] padded positions ("index")
    weights: torch.Tensor | None = None  # [B, S] averaging weights ("mean")
    mask: torch.Tensor | None = None  # [B, S] tokens to keep ("all")


def make_batch(enc: Encoded, rows: range, spec: PositionSpec, pad_id: int, side: str,
               with_position_ids: bool) -> Batch:
    """Pad ``rows`` of ``enc`` on ``side``; position ids count real tokens only (as ``generate`` does)."""
    lengths = enc.lengths[rows.start: rows.stop]
    b, s = len(rows), int(lengths.max())
    input_ids = torch.full((b, s), pad_id, dtype=torch.int64)
    mask = torch.zeros(b, s, dtype=torch.int64)
    shift = (s - lengths) if side == "left" else torch.zeros_like(lengths)
    for r, i in enumerate(rows):
        lo, length = int(shift[r]), int(lengths[r])
        input_ids[r, lo: lo + length] = enc.ids(i)
        mask[r, lo: lo + length] = 1
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    if with_position_ids:
        # Left padding must not shift absolute positions: the k-th real token gets position k.
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    batch = Batch(inputs, b, s, lengths)
    sel = list(rows)
    if spec.kind == "index":
        batch.gather = enc.index[sel] + shift[:, None]
    else:
        lo = enc.ranges[sel, 0] + shift
        hi = enc.ranges[sel, 1] + shift
        pos = torch.arange(s)
        keep = (pos[None] >= lo[:, None]) & (pos[None] < hi[:, None])
        if spec.kind == "mean":
            batch.weights = keep.to(torch.float32) / (hi - lo).clamp_min(1)[:, None].to(torch.float32)
        else:
            batch.mask = keep
            batch.lengths = hi - lo
    return batch


def select(x: torch.Tensor, batch: Batch, spec: PositionSpec) -> torch.Tensor:
    """Read the requested positions out of an activation ``[B, S, ...]`` (or ``[B*S, ...]``).

    Returns ``[B, ...]`` (one position, or a mean), ``[B, k, ...]`` (several) or ``[T, ...]`` ("all").
    """
    b, s = batch.size, batch.seq
    if x.ndim >= 2 and x.shape[0] == b * s and (x.ndim == 2 or x.shape[1] != s):
        x = x.reshape(b, s, *x.shape[1:])  # e.g. MoE blocks that flatten tokens
    if x.ndim < 3 or x.shape[0] != b or x.shape[1] != s:
        raise PositionsError(f"activation of shape {tuple(x.shape)} is not [batch={b}, seq={s}, ...]")
    dev = x.device
    if spec.kind == "index":
        idx = batch.gather.to(dev)
        out = x[torch.arange(b, device=dev)[:, None], idx]
        return out[:, 0] if spec.squeeze else out
    if spec.kind == "mean":
        w = batch.weights.to(dev)
        flat = x.reshape(b, s, -1).to(torch.float32)
        return torch.bmm(w[:, None, :], flat).reshape(b, *x.shape[2:])
    return x[batch.mask.to(dev)]
