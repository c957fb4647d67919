"""``Activations``: what :func:`~intervene.activations.collect` returns.

A read-only mapping ``site -> tensor`` plus the rows' labels and metadata. Tensors are ``[N, D]``
(one position per example), ``[N, k, D]`` (``k`` explicit positions), ``[N, H, Dh]`` for
``layers.{i}.heads``, or, for ``positions="all"``, a flat ``[total_tokens, ...]`` tensor with
``offsets`` ``[N+1]`` (example ``i`` owns rows ``offsets[i]:offsets[i+1]``).

Backed by memory (no ``cache_dir``) or by a shard cache on disk, which is read lazily: indexing
one site reads only that site from each shard (its byte range, after the shard's checksum is verified).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from intervene.activations.cache import ShardReader


class Activations(Mapping[str, torch.Tensor]):
    """Mapping site name -> activations, with ``labels`` ``[N]`` and per-row ``meta`` columns.

    ``len(acts)`` is the number of sites (it is a mapping); ``acts.n`` is the number of examples.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | None = None,
        *,
        sites: Sequence[str],
        n: int,
        positions: Any = "last",
        lengths: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        meta: Mapping[str, list] | None = None,
        reader: ShardReader | None = None,
    ) -> None:
        if (tensors is None) == (reader is None):
            raise ValueError("Activations need either in-memory tensors or a cache reader")
        self.sites = list(sites)
        self.n = int(n)
        self.positions = positions
        self._tensors = dict(tensors) if tensors is not None else None
        self._reader = reader
        self._lengths = lengths
        self.labels = labels
        self.meta: dict[str, list] = dict(meta or {})

    # ---- mapping -----------------------------------------------------------------------------
    def __getitem__(self, site: str) -> torch.Tensor:
        if site not in self.sites:
            raise KeyError(f"no activations for site {site!r}; collected: {self.sites}")
        if self._tensors is not None:
            return self._tensors[site]
        return self._reader.get(site)

    def __iter__(self) -> Iterator[str]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __repr__(self) -> str:
        where = f"cache={str(self.cache_path)!r}" if self.cache_path else "in memory"
        return f"Activations(n={self.n}, sites={self.sites}, positions={self.positions!r}, {where})"

    # ---- extras ------------------------------------------------------------------------------
    @property
    def cache_path(self) -> Path | None:
        """The cache directory backing these activations, or ``None`` when they live in memory."""
        return self._reader.root if self._reader is not None else None

    @property
    def ragged(self) -> bool:
        """True for ``positions="all"``: tensors are flat over tokens, see :attr:`offsets`."""
        return self.positions == "all"

    @property
    def offsets(self) -> torch.Tensor | None:
        """``[N+1]`` int64 token offsets of each example into the flat tensors (``positions="all"``)."""
        if not self.ragged:
            return None
        if self._lengths is None:
            self._lengths = self._reader.lengths()
        return torch.cat([torch.zeros(1, dtype=torch.int64), self._lengths.cumsum(0)])

    def example(self, site: str, i: int) -> torch.Tensor:
        """Example ``i``'s activations at ``site``: ``[D]``/``[H, Dh]``, or ``[T_i, ...]`` when ragged."""
        if self.ragged:
            off = self.offsets
            return self[site][int(off[i]): int(off[i + 1])]
        if self._reader is not None:
            return self._reader.get_rows(site, i, i + 1)[0]
        return self[site][i]

    def stack(self, sites: Sequence[str] | None = None) -> torch.Tensor:
        """Sites stacked on a new leading dim: ``[len(sites), N, ...]`` (e.g. ``[L, N, D]`` for probes)."""
        names = list(self.sites if sites is None else sites)
        return torch.stack([self[s] for s in names])

    def column(self, name: str) -> list:
        """One metadata column (a list of N values) of the rows the activations came from."""
        if name not in self.meta:
            raise KeyError(f"no metadata column {name!r}; have {sorted(self.meta)}")
        return self.meta[name]

    def load(self) -> Activations:
        """An in-memory copy (reads every site from the cache once)."""
        tensors = {s: self[s] for s in self.sites}
        return Activations(tensors, sites=self.sites, n=self.n, positions=self.positions,
                           lengths=None if not self.ragged else self.offsets.diff(), labels=self.labels,
                           meta=self.meta)

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> Activations:
        """Open a complete cache directory written by :func:`collect` (labels/metadata are not stored)."""
        reader = ShardReader(Path(path), verify=verify)
        idx = reader.index
        return cls(sites=idx["sites"], n=idx["n"], positions=idx["positions"], reader=reader)
