"""Reading a latent cache written by :func:`intervene.features.cache.cache_latents` (layout described there).

Everything is checked before it is used (docs/architecture.md, "Validating files"): ``index.json``
against :class:`~intervene.schemas.caches.LatentIndex` and for consistency (``n_shards`` is
``ceil(d_sae / shard_width)``, parts below ``n_parts``); the headers of ``tokens`` and ``stats``
against the index's sizes, so every allocation follows the real files, not a declared number; each
part, the first time it is read, against its recorded size and sha256 (version 2, like the
activation cache's shards) and for structure (CSR offsets, ascending positions inside the corpus,
finite values). Files are read only through :class:`~intervene.safeio.Root`. Version 1 caches
record no checksums: they load with an :class:`~intervene.errors.UncheckedFileWarning`.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from intervene.errors import LatentCacheError, UncheckedFileWarning
from intervene.safeio import Root
from intervene.schemas.base import validate
from intervene.schemas.caches import LatentIndex
from intervene.tensorfile import Header, check_tensor, file_sha256, load_tensors, read_header, read_slice

FORMAT = "intervene-latent-cache"
VERSION = 2
INDEX = "index.json"
TOKENS = "tokens.safetensors"
STATS = "stats.safetensors"
_PART = re.compile(r"^shards/([0-9]{5})/([0-9]{6})\.safetensors$")


def part_name(shard: int, part: int) -> str:
    return f"shards/{shard:05d}/{part:06d}.safetensors"


@dataclass
class LatentActivations:
    """One latent's non-zero activations: ``positions`` ``[m]`` (flat token indices, ascending), ``values`` ``[m]``."""

    latent: int
    positions: torch.Tensor
    values: torch.Tensor


def read_latent_index(root: Root) -> dict[str, Any]:
    """``index.json`` checked against the schema and for consistency; the raw object."""
    if not root.exists(INDEX):
        raise LatentCacheError(f"{root.path} is not a latent cache (no {INDEX})", path=root.path, field=INDEX)
    raw = root.read_json(INDEX)
    where = root.path / INDEX
    if isinstance(raw, dict) and (raw.get("format") != FORMAT or raw.get("version") not in (1, 2)):
        raise LatentCacheError.at(where, "format", f"{FORMAT!r} version 1 or 2",
                                  f"{raw.get('format')!r} v{raw.get('version')!r}")
    idx = validate(LatentIndex, raw, LatentCacheError, where)
    if idx.n_shards != math.ceil(idx.d_sae / idx.shard_width):
        raise LatentCacheError.at(where, "n_shards", f"ceil(d_sae / shard_width) = "
                                  f"{math.ceil(idx.d_sae / idx.shard_width)}", idx.n_shards)
    n_batches = math.ceil(idx.n_seq / idx.batch_size)
    first, last = (0, n_batches) if idx.block is None else (idx.block[0], idx.block[1])
    if not 0 <= first <= last <= n_batches:
        raise LatentCacheError.at(where, "block", f"a batch range within [0, {n_batches}]", idx.block)
    if not first <= idx.next_batch <= last or idx.n_parts > last - first + 1 or (idx.done and idx.next_batch != last):
        raise LatentCacheError.at(where, "next_batch", f"progress within batches [{first}, {last})",
                                  [idx.next_batch, idx.n_parts, idx.done])
    if idx.version >= 2:
        if idx.files is None:
            raise LatentCacheError.at(where, "files", "the size and sha256 of every file (version 2)")
        for name in idx.files:
            m = _PART.match(name)
            if name not in (TOKENS, STATS) and (m is None or int(m.group(1)) >= idx.n_shards
                                                or int(m.group(2)) >= idx.n_parts):
                raise LatentCacheError.at(where, "files", "tokens, stats and parts below n_shards / n_parts", name)
    elif idx.files is not None:
        raise LatentCacheError.at(where, "files", "no file records in a version 1 index")
    return raw


class LatentCache:
    """Read a cache written by :func:`cache_latents` (``index``, tokens, per-latent activations, stats)."""

    def __init__(self, path: str | Path, check_done: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists() and not self.path.is_symlink():
            raise LatentCacheError(f"{self.path} is not a latent cache (no {INDEX})", path=self.path, field=INDEX)
        self._root = Root(self.path, LatentCacheError)
        self.index = read_latent_index(self._root)
        if check_done and not self.index.get("done"):
            raise LatentCacheError(f"{self.path}: the cache is incomplete (resume it with cache_latents)",
                                   path=self.path / INDEX, field="done")
        if self.index["version"] < 2 and check_done:
            warnings.warn(f"{self.path} is a version 1 latent cache, which records no checksums: it is read without "
                          "an integrity check", UncheckedFileWarning, stacklevel=2)
        self._files: dict[str, dict[str, Any]] | None = self.index.get("files")
        self._headers: dict[str, Header] = {}
        self._offsets: dict[str, torch.Tensor] = {}
        self._tokens: torch.Tensor | None = None
        self._stats: dict[str, torch.Tensor] | None = None
        if check_done:
            self._check_header(TOKENS, {"tokens": (torch.int32, (self.n_seq, self.ctx_len))})
            self._check_header(STATS, {"count": (torch.int64, (self.n_latents,)), "max": (None, (self.n_latents,)),
                                       "sum": (None, (self.n_latents,))})

    # ---- checked reads ---------------------------------------------------------------------------
    def _verified(self, name: str) -> Header:
        """The header of ``name``, its size and sha256 checked against the index the first time (version 2)."""
        header = self._headers.get(name)
        if header is None:
            if self._files is not None:
                rec = self._files.get(name)
                if rec is None:
                    raise LatentCacheError.at(self.path / INDEX, "files", f"a record for {name}")
                size = self._root.size(name)
                if size != rec["bytes"] or file_sha256(self._root, name) != rec["sha256"]:
                    raise LatentCacheError.at(self.path / name, "sha256", f"{rec['sha256']} ({rec['bytes']} bytes)",
                                              note="the file is corrupt or truncated")
            header = read_header(self._root, name)
            self._headers[name] = header
        return header

    def _check_header(self, name: str, want: dict[str, tuple[torch.dtype | None, tuple[int, ...]]]) -> Header:
        header = self._verified(name)
        if set(header.tensors) != set(want):
            raise LatentCacheError.at(self.path / name, "tensors", f"exactly {sorted(want)}", sorted(header.tensors))
        for k, (dtype, shape) in want.items():
            info = header.tensors[k]
            if info.shape != shape or (dtype is not None and info.dtype != dtype) or \
                    (dtype is None and not info.dtype.is_floating_point):
                raise LatentCacheError.at(self.path / name, k, f"{dtype or 'floating'} {list(shape)}",
                                          f"{info.dtype} {list(info.shape)}")
        return header

    @property
    def n_latents(self) -> int:
        return int(self.index["d_sae"])

    @property
    def ctx_len(self) -> int:
        return int(self.index["ctx_len"])

    @property
    def n_seq(self) -> int:
        return int(self.index["n_seq"])

    @property
    def site(self) -> str:
        return str(self.index["site"])

    @property
    def tokens(self) -> torch.Tensor:
        """``[n_seq, ctx_len]`` int32 token ids (loaded once)."""
        if self._tokens is None:
            self._check_header(TOKENS, {"tokens": (torch.int32, (self.n_seq, self.ctx_len))})
            t, _, _ = load_tensors(self._root, TOKENS)
            if bool((t["tokens"] < 0).any()):
                raise LatentCacheError.at(self.path / TOKENS, "tokens", "non-negative token ids")
            self._tokens = t["tokens"]
        return self._tokens

    @property
    def n_tokens(self) -> int:
        return self.n_seq * self.ctx_len

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """Per latent ``count`` (firings), ``max`` and ``mean`` (over firings) activation, ``[n_latents]`` each."""
        if self._stats is None:
            n = (self.n_latents,)
            self._check_header(STATS, {"count": (torch.int64, n), "max": (None, n), "sum": (None, n)})
            s, _, _ = load_tensors(self._root, STATS)
            where = self.path / STATS
            fired = s["count"] > 0
            if bool((s["count"] < 0).any()) or bool((s["count"] > self.n_tokens).any()):
                raise LatentCacheError.at(where, "count", f"counts in [0, n_tokens={self.n_tokens}]")
            check_tensor(s["sum"], LatentCacheError, where, "sum")
            check_tensor(s["max"][fired], LatentCacheError, where, "max of latents that fired")
            s["mean"] = (s["sum"] / s["count"].clamp_min(1)).float()
            s["max"] = torch.where(fired, s["max"], torch.zeros_like(s["max"]))
            self._stats = s
        return self._stats

    def tokenizer(self) -> Any:
        """The tokenizer saved with the cache (``None`` when none was given); its files are checked like the
        cache's own (regular files inside the cache, no subfolders) before transformers reads them."""
        if self._root.kind("tokenizer") != "dir":
            return None
        for name in self._root.listdir("tokenizer", limit=64):
            self._root.size(f"tokenizer/{name}")  # refuses FIFOs, devices, symlinks leading outside
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.path / "tokenizer"), trust_remote_code=False)
        except Exception as e:  # transformers raises many kinds on a malformed tokenizer folder
            raise LatentCacheError.at(self.path / "tokenizer", None, "a tokenizer transformers can load",
                                      note=f"{type(e).__name__}: {str(e)[:200]}") from None

    def _parts(self, shard: int) -> list[str]:
        """The part files of ``shard`` the index counts (version 1: those on disk below ``n_parts``)."""
        prefix = f"shards/{shard:05d}/"
        if self._files is not None:
            return sorted(n for n in self._files if n.startswith(prefix))
        if self._root.kind(prefix[:-1]) != "dir":
            return []
        names = []
        for n in self._root.listdir(prefix[:-1]):
            m = re.fullmatch(r"([0-9]{6})\.safetensors", n)
            if m is not None and int(m.group(1)) < int(self.index["n_parts"]):
                names.append(prefix + n)
        return sorted(names)

    def _part(self, name: str, shard: int) -> tuple[Header, torch.Tensor]:
        """A part's header and its CSR offsets, the whole part checked the first time it is read."""
        if name in self._offsets:
            return self._headers[name], self._offsets[name]
        header = self._verified(name)
        width = int(self.index["shard_width"])
        n_lat = min(width, self.n_latents - shard * width)
        where = self.path / name
        if set(header.tensors) != {"positions", "values", "offsets"}:
            raise LatentCacheError.at(where, "tensors", "positions, values and offsets", sorted(header.tensors))
        t, _, _ = load_tensors(self._root, name)
        pos, val, off = t["positions"], t["values"], t["offsets"]
        m = pos.shape[0] if pos.ndim == 1 else -1
        if pos.dtype != torch.int64 or pos.ndim != 1 or off.dtype != torch.int64 or tuple(off.shape) != (n_lat + 1,):
            raise LatentCacheError.at(where, "positions/offsets", f"int64 [m] and int64 [{n_lat + 1}]",
                                      f"{pos.dtype} {list(pos.shape)}, {off.dtype} {list(off.shape)}")
        check_tensor(val, LatentCacheError, where, "values", (m,))
        if str(val.dtype).removeprefix("torch.") != self.index["value_dtype"]:
            raise LatentCacheError.at(where, "values", f"dtype {self.index['value_dtype']} (the index's value_dtype)",
                                      str(val.dtype))
        if int(off[0]) != 0 or int(off[-1]) != m or bool((off.diff() < 0).any()):
            raise LatentCacheError.at(where, "offsets", f"non-decreasing CSR offsets from 0 to {m}")
        if m and (int(pos.min()) < 0 or int(pos.max()) >= self.n_tokens):
            raise LatentCacheError.at(where, "positions", f"token indices in [0, {self.n_tokens})")
        step = pos.diff() > 0
        starts = off[1:-1]
        starts = starts[(starts > 0) & (starts < m)]
        step[starts - 1] = True  # a new latent's positions start afresh
        if not bool(step.all()):
            raise LatentCacheError.at(where, "positions", "strictly ascending positions within each latent")
        self._offsets[name] = off
        return header, off

    def latent(self, latent: int) -> LatentActivations:
        """Every non-zero activation of ``latent`` across the corpus."""
        if not 0 <= int(latent) < self.n_latents:
            raise LatentCacheError(f"latent {latent} out of range [0, {self.n_latents})")
        width = int(self.index["shard_width"])
        shard, j = divmod(int(latent), width)
        pos, val = [], []
        for name in self._parts(shard):
            header, off = self._part(name, shard)
            a, b = int(off[j]), int(off[j + 1])
            if b > a:
                pos.append(read_slice(self._root, name, header, "positions", a, b))
                val.append(read_slice(self._root, name, header, "values", a, b))
        count = int(self.stats["count"][int(latent)]) if self.index.get("done") else None
        found = sum(int(x.numel()) for x in pos)
        if count is not None and found != count:  # stats are checksummed: a part the index lost shows here
            raise LatentCacheError.at(self.path, f"latent {latent}", f"{count} entries (stats.safetensors)", found,
                                      note="a part is missing from the cache or its index")
        if not pos:
            return LatentActivations(int(latent), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
        p = torch.cat(pos)
        if p.numel() > 1 and not bool((p.diff() > 0).all()):  # parts follow each other in corpus order
            raise LatentCacheError.at(self.path, f"latent {latent}", "positions ascending across parts")
        return LatentActivations(int(latent), p, torch.cat(val))

    def _shard_entries(self, shard: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(first latent, latent ids, values)`` per part of ``shard`` (for whole-shard scans)."""
        width = int(self.index["shard_width"])
        for name in self._parts(shard):
            _, off = self._part(name, shard)
            t, _, _ = load_tensors(self._root, name)
            lat = torch.repeat_interleave(torch.arange(off.numel() - 1), off.diff())
            yield shard * width, lat, t["values"]

    def dense(self, latents: Sequence[int] | None = None) -> torch.Tensor:
        """``[n_tokens, len(latents)]`` dense activations (for tests and small caches only)."""
        ids = list(range(self.n_latents)) if latents is None else [int(i) for i in latents]
        out = torch.zeros(self.n_tokens, len(ids))
        for c, i in enumerate(ids):
            rec = self.latent(i)
            out[rec.positions, c] = rec.values.float()
        return out

    def cooccurring(self, latent: int, top: int = 10) -> list[tuple[int, int]]:
        """The ``top`` latents firing most often on the same tokens as ``latent``: ``[(latent, count)]``.

        One latent's row of the co-occurrence matrix, computed by streaming the shards (the full
        ``n x n`` matrix is never built).
        """
        target = self.latent(latent).positions
        counts = torch.zeros(self.n_latents, dtype=torch.int64)
        if target.numel():
            width = int(self.index["shard_width"])
            for s in range(int(self.index["n_shards"])):
                for name in self._parts(s):
                    _, off = self._part(name, s)
                    t, _, _ = load_tensors(self._root, name)
                    idx = torch.searchsorted(target, t["positions"]).clamp_max(target.numel() - 1)
                    hit = target[idx] == t["positions"]
                    lat = torch.repeat_interleave(torch.arange(off.numel() - 1), off.diff())
                    counts += torch.bincount(lat[hit] + s * width, minlength=self.n_latents)
        counts[int(latent)] = 0
        k = min(top, int((counts > 0).sum()))
        vals, idx = counts.topk(k) if k else (counts[:0], counts[:0])
        return list(zip(idx.tolist(), vals.tolist()))
