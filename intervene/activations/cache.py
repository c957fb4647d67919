"""The on-disk activation cache: safetensors shards plus a JSON index, each written atomically.

Layout of one cache entry (a directory named after the cache key)::

    index.json             format, key, what was collected, and the list of complete shards
    shard-00000.safetensors    rows [start, stop) of every site (+ ``__lengths__`` for ragged data)
    shard-00001.safetensors    ...

A shard is listed in the index only after it is fully on disk, and the index is replaced
atomically after every shard, so an interrupted run leaves a valid prefix that the next run
resumes from. Each listed shard records its size and sha256: a truncated shard fails the size
check when the cache is opened, a corrupted one fails the hash check the first time it is read.
Neither is ever read silently. The index is checked against :class:`~intervene.schemas.caches.ActivationIndex`
and every tensor (its dtype, shape, rows and finite values) before it is returned; files are read
only through :class:`~intervene.safeio.Root`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from intervene.errors import ActivationCacheError
from intervene.fileio import atomic_write_bytes, dir_lock, sweep_temporaries
from intervene.safeio import Root
from intervene.schemas.base import validate
from intervene.schemas.caches import ActivationIndex
from intervene.tensorfile import Header, check_tensor, read_header, read_slice
from intervene.tensorfile import file_sha256 as tensorfile_sha256

FORMAT = "intervene-activations"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
LENGTHS_KEY = "__lengths__"  # ragged ("all" positions): tokens per row, [rows] int64
_HASH_CHUNK = 1 << 20


def cache_key(parts: dict[str, Any]) -> str:
    """A stable hex digest of everything that determines the cached tensors."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a file we wrote (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_index(root: Path | Root) -> dict[str, Any]:
    """Parse ``root/index.json`` and check it against :class:`~intervene.schemas.caches.ActivationIndex`;
    raises :class:`ActivationCacheError` naming the file and field."""
    r = root if isinstance(root, Root) else Root(root, ActivationCacheError)
    if not r.exists(INDEX_NAME):
        raise ActivationCacheError.at(r.path, INDEX_NAME, f"an {INDEX_NAME}", note="not an activation cache")
    raw = r.read_json(INDEX_NAME)
    index = validate(ActivationIndex, raw, ActivationCacheError, r.path / INDEX_NAME)
    where = r.path / INDEX_NAME
    if len(set(index.sites)) != len(index.sites):
        raise ActivationCacheError.at(where, "sites", "distinct site names", index.sites)
    extra = sorted(set(index.shapes) - set(index.sites) - {LENGTHS_KEY})
    if extra:
        raise ActivationCacheError.at(where, f"shapes.{extra[0]}", f"a shape per collected site {index.sites}", extra[0])
    names = [e.file for e in index.shards]
    if len(set(names)) != len(names):
        raise ActivationCacheError.at(where, "shards", "distinct shard files", names)
    return raw


def check_shard_files(root: Path | Root, index: dict[str, Any]) -> None:
    """Cheap checks of every listed shard: a regular file inside the cache, the recorded size, contiguous
    row ranges ending at ``n`` once the cache is complete."""
    r = root if isinstance(root, Root) else Root(root, ActivationCacheError)
    where = r.path / INDEX_NAME
    expected_start = 0
    for i, entry in enumerate(index["shards"]):
        size = r.size(entry["file"], f"shards[{i}].file")
        if size != entry["bytes"]:
            raise ActivationCacheError.at(r.path / entry["file"], None, f"{entry['bytes']} bytes (the index records so)",
                                          size, note=f"truncated or overwritten; delete {r.path} to recompute")
        if entry["start"] != expected_start or entry["stop"] < entry["start"]:
            raise ActivationCacheError.at(where, f"shards[{i}]", f"rows starting at {expected_start}",
                                          [entry["start"], entry["stop"]], note="shard ranges are not contiguous")
        expected_start = entry["stop"]
    if expected_start > index["n"]:
        raise ActivationCacheError.at(where, "shards", f"at most n={index['n']} rows", expected_start)


class ShardWriter:
    """Buffers per-batch tensors and writes them as shards of about ``shard_bytes`` each.

    Shards are serialized and written by one background thread while the model runs the next
    batches; at most one shard is in flight, so memory stays O(shard). Rows must be added in
    order; ``done_rows`` says where a resumed run has to start.
    """

    def __init__(self, root: Path, header: dict[str, Any], shard_bytes: int, background: bool = True) -> None:
        self.root = root
        self.shard_bytes = max(1, int(shard_bytes))
        root.mkdir(parents=True, exist_ok=True)
        # One writer at a time per cache (released in close, or by the kernel if the process dies); then
        # what a killed writer left half-written can be removed safely.
        self._dirlock = contextlib.ExitStack()
        self._dirlock.enter_context(dir_lock(root, exclusive=True))
        sweep_temporaries(root, [INDEX_NAME, "shard-*"])
        self.index: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, **header,
                                      "shards": [], "complete": False}
        try:
            if os.path.lexists(root / INDEX_NAME):
                old = read_index(root)
                same = all(old.get(k) == v for k, v in json.loads(json.dumps(header)).items() if k != "shapes")
                if not same:
                    raise ActivationCacheError(f"{root} holds activations for another key; delete it to recompute",
                                               path=root / INDEX_NAME, field="key")
                check_shard_files(root, old)
                self.index["shards"] = old["shards"]
                self.index["shapes"] = old["shapes"] if old["shards"] else {}
                self.index["complete"] = bool(old.get("complete"))
        except BaseException:
            self._dirlock.close()
            raise
        self.done_rows = self.index["shards"][-1]["stop"] if self.index["shards"] else 0
        self._buffer: list[dict[str, torch.Tensor]] = []
        self._buffer_rows = 0
        self._buffer_bytes = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intervene-shards") if background else None
        self._pending: Future | None = None

    @property
    def complete(self) -> bool:
        return bool(self.index["complete"])

    def add(self, tensors: dict[str, torch.Tensor], rows: int) -> None:
        """Append one batch (``rows`` examples); flushes a shard once the buffer is large enough."""
        self._buffer.append(tensors)
        self._buffer_rows += rows
        self._buffer_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        if self._buffer_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        keys = self._buffer[0].keys()
        tensors = {k: torch.cat([b[k] for b in self._buffer]).contiguous() for k in keys}
        start = self.done_rows
        stop = start + self._buffer_rows
        self._buffer, self._buffer_rows, self._buffer_bytes = [], 0, 0
        self.done_rows = stop
        self.wait()  # one shard in flight at most: bounded memory, and errors surface early
        if self._pool is None:
            self._write(tensors, start, stop)
        else:
            self._pending = self._pool.submit(self._write, tensors, start, stop)

    def wait(self) -> None:
        """Block until the shard in flight (if any) is on disk and indexed; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write(self, tensors: dict[str, torch.Tensor], start: int, stop: int) -> None:
        with self._lock:
            number = len(self.index["shards"])
            name = f"shard-{number:05d}.safetensors"
            data = st_save(tensors, metadata={"start": str(start), "stop": str(stop)})
            atomic_write_bytes(self.root / name, data)
            self.index["shards"].append({"file": name, "start": start, "stop": stop, "bytes": len(data),
                                         "sha256": hashlib.sha256(data).hexdigest()})
            self._write_index()

    def _write_index(self) -> None:
        atomic_write_bytes(self.root / INDEX_NAME, json.dumps(self.index, indent=1) + "\n")

    def close(self, complete: bool) -> None:
        """Write what is buffered; mark the cache complete if ``complete``. Safe to call after errors."""
        try:
            if complete:
                self.flush()
            self.wait()
            if complete:
                with self._lock:
                    self.index["complete"] = True
                    self._write_index()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._dirlock.close()


class ShardReader:
    """Lazy access to a complete cache: each shard's sha256 is verified on first use, then each tensor is read
    alone and checked (dtype, shape, rows, finite values) before it is returned."""

    def __init__(self, root: Path, verify: bool = True) -> None:
        self.root = Path(root)
        self._r = Root(self.root, ActivationCacheError)
        self.index = read_index(self._r)
        if not self.index.get("complete"):
            raise ActivationCacheError(f"{self.root} is incomplete (an interrupted collect); rerun collect "
                                       "with the same arguments to finish it", path=self.root, field="complete")
        check_shard_files(self._r, self.index)
        stop = self.index["shards"][-1]["stop"] if self.index["shards"] else 0
        if self.index["shards"] and stop != self.index["n"]:
            raise ActivationCacheError.at(self.root / INDEX_NAME, "shards", f"rows covering n={self.index['n']}", stop)
        self.ragged = self.index["positions"] == "all"
        self._keys = set(self.index["sites"]) | ({LENGTHS_KEY} if self.ragged else set())
        self.verify = verify
        self._headers: dict[str, Header] = {}

    def _header(self, entry: dict[str, Any]) -> Header:
        header = self._headers.get(entry["file"])
        if header is None:
            if self.verify:
                digest = tensorfile_sha256(self._r, entry["file"])
                if digest != entry["sha256"]:
                    raise ActivationCacheError.at(self.root / entry["file"], "sha256", entry["sha256"], digest,
                                                  note=f"the shard is corrupt; delete {self.root} to recompute")
            header = read_header(self._r, entry["file"])
            if set(header.tensors) != self._keys:
                raise ActivationCacheError.at(self.root / entry["file"], "tensors", f"exactly {sorted(self._keys)}",
                                              sorted(header.tensors))
            self._headers[entry["file"]] = header
        return header

    def _tensor(self, key: str, entry: dict[str, Any]) -> torch.Tensor:
        header = self._header(entry)
        info = header.tensors[key]
        where, rows = self.root / entry["file"], entry["stop"] - entry["start"]
        t = read_slice(self._r, entry["file"], header, key, 0, info.shape[0] if info.shape else 1)
        if key == LENGTHS_KEY:
            if t.dtype != torch.int64 or tuple(t.shape) != (rows,) or bool((t < 0).any()):
                raise ActivationCacheError.at(where, key, f"int64 [{rows}] non-negative token counts",
                                              f"{t.dtype} {list(t.shape)}")
            return t
        shape = self.index["shapes"].get(key)
        if shape is None:
            raise ActivationCacheError.at(self.root / INDEX_NAME, f"shapes.{key}", "the site's trailing shape")
        lead = None if self.ragged else rows
        check_tensor(t, ActivationCacheError, where, key, (lead, *shape))
        if str(t.dtype).removeprefix("torch.") != self.index["dtype"]:
            raise ActivationCacheError.at(where, key, f"dtype {self.index['dtype']}", str(t.dtype))
        if self.ragged and t.shape[0] != int(self._tensor(LENGTHS_KEY, entry).sum()):
            raise ActivationCacheError.at(where, key, "as many rows as the shard's tokens", t.shape[0])
        return t

    def _read(self, key: str, entries: list[dict[str, Any]]) -> list[torch.Tensor]:
        if key not in self._keys:
            raise ActivationCacheError.at(self.root / INDEX_NAME, "sites", f"a site named {key!r}")
        return [self._tensor(key, e) for e in entries]

    def _empty(self, key: str) -> torch.Tensor:
        shape = self.index["shapes"].get(key, [])
        return torch.empty(0, *shape, dtype=getattr(torch, self.index["dtype"]))

    def get(self, key: str) -> torch.Tensor:
        """One site's tensor over all rows (only this site is read from each shard)."""
        parts = self._read(key, self.index["shards"])
        return torch.cat(parts) if parts else self._empty(key)

    def lengths(self) -> torch.Tensor:
        """Tokens per row for ragged caches, ``[N]`` int64."""
        parts = self._read(LENGTHS_KEY, self.index["shards"])
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of a non-ragged site, touching only the shards that hold them."""
        parts = []
        for entry in self.index["shards"]:
            lo, hi = max(start, entry["start"]), min(stop, entry["stop"])
            if lo < hi:
                t = self._read(key, [entry])[0]
                parts.append(t[lo - entry["start"]: hi - entry["start"]])
        return torch.cat(parts) if parts else self._empty(key)


def rank_dir(root: Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` writes its block of a cache (merged into ``root`` by rank 0)."""
    return root / f"rank-{rank:03d}-of-{world:03d}"


def merge_rank_caches(root: Path, world: int, header: dict[str, Any]) -> None:
    """Rank 0, once every rank has finished its block: link the ranks' shards into ``root`` in row order and
    write one complete index, as a single process would have. Idempotent: a rerun after a crash redoes it.

    The shards' bytes are not copied (hard links; a copy where links are not supported) and keep the sha256
    and size their rank recorded, so the result is checked exactly like a single-process cache.
    """
    root.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    offset = 0
    shapes: dict[str, Any] = {}
    with dir_lock(root, exclusive=True):
        for rank in range(world):
            sub = rank_dir(root, rank, world)
            index = read_index(sub)
            if not index.get("complete"):
                raise ActivationCacheError(f"{sub} is incomplete: rank {rank} did not finish its block",
                                           path=sub / INDEX_NAME, field="complete")
            check_shard_files(sub, index)
            shapes = shapes or index["shapes"]
            for entry in index["shards"]:
                name = f"shard-{len(shards):05d}.safetensors"
                target = root / name
                if os.path.lexists(target):
                    target.unlink()
                try:
                    os.link(sub / entry["file"], target)
                except OSError:  # a file system without hard links
                    import shutil

                    shutil.copyfile(sub / entry["file"], target)
                shards.append({**entry, "file": name, "start": entry["start"] + offset,
                               "stop": entry["stop"] + offset})
            offset += index["n"]
        if offset != header["n"]:
            raise ActivationCacheError(f"the ranks' blocks hold {offset} rows, the data has {header['n']}",
                                       path=root, field="n")
        index = {"format": FORMAT, "format_version": FORMAT_VERSION, **header, "shapes": shapes,
                 "shards": shards, "complete": True}
        atomic_write_bytes(root / INDEX_NAME, json.dumps(index, indent=1) + "\n")
