"""The on-disk activation cache: safetensors shards plus a JSON index, each written atomically.

Layout of one cache entry (a directory named after the cache key)::

    index.json             format, key, what was collected, and the list of complete shards
    shard-00000.safetensors    rows [start, stop) of every site (+ ``__lengths__`` for ragged data)
    shard-00001.safetensors    ...

A shard is listed in the index only after it is fully on disk, and the index is replaced
atomically after every shard, so an interrupted run leaves a valid prefix that the next run
resumes from. Each listed shard records its size and sha256: a truncated shard fails the size
check when the cache is opened, a corrupted one fails the hash check the first time it is read.
Neither is ever read silently.
"""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from intervene.errors import ActivationCacheError
from intervene.fileio import atomic_write_bytes

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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_index(root: Path) -> dict[str, Any]:
    """Parse ``root/index.json`` and check its structure; raises :class:`ActivationCacheError`."""
    path = root / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise ActivationCacheError(f"{root} has no {INDEX_NAME}: not an activation cache") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ActivationCacheError(f"{path} is not valid JSON (corrupt or truncated): {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ActivationCacheError(f"{path} is not an intervene activation index")
    if index.get("format_version") != FORMAT_VERSION:
        raise ActivationCacheError(f"{path} has format version {index.get('format_version')!r}; "
                                   f"this intervene reads version {FORMAT_VERSION}")
    if not isinstance(index.get("shards"), list) or not isinstance(index.get("sites"), list):
        raise ActivationCacheError(f"{path} lacks its 'shards' or 'sites' list")
    return index


def check_shard_files(root: Path, index: dict[str, Any]) -> None:
    """Cheap checks of every listed shard: present, the recorded size, contiguous row ranges."""
    expected_start = 0
    for entry in index["shards"]:
        path = root / entry["file"]
        if Path(entry["file"]).name != entry["file"]:
            raise ActivationCacheError(f"{root / INDEX_NAME} names a shard outside the cache: {entry['file']!r}")
        if not path.is_file():
            raise ActivationCacheError(f"shard {path} is listed in the index but missing; delete {root} "
                                       "to recompute")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ActivationCacheError(f"shard {path} has {size} bytes, the index records {entry['bytes']} "
                                       f"(truncated or overwritten); delete {root} to recompute")
        if entry["start"] != expected_start or entry["stop"] < entry["start"]:
            raise ActivationCacheError(f"{root / INDEX_NAME}: shard row ranges are not contiguous")
        expected_start = entry["stop"]


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
        self.index: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, **header,
                                      "shards": [], "complete": False}
        if (root / INDEX_NAME).is_file():
            old = read_index(root)
            if old.get("key") != header["key"]:
                raise ActivationCacheError(f"{root} holds activations for another key; delete it to recompute")
            check_shard_files(root, old)
            self.index["shards"] = old["shards"]
            self.index["complete"] = bool(old.get("complete"))
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


class ShardReader:
    """Lazy, memory-mapped access to a complete cache; verifies each shard's hash on first use."""

    def __init__(self, root: Path, verify: bool = True) -> None:
        self.root = Path(root)
        self.index = read_index(self.root)
        if not self.index.get("complete"):
            raise ActivationCacheError(f"{self.root} is incomplete (an interrupted collect); rerun collect "
                                       "with the same arguments to finish it")
        check_shard_files(self.root, self.index)
        if self.index["shards"] and self.index["shards"][-1]["stop"] != self.index["n"]:
            raise ActivationCacheError(f"{self.root}: shards cover {self.index['shards'][-1]['stop']} rows, "
                                       f"the index says {self.index['n']}")
        self.verify = verify
        self._verified: set[str] = set()

    def _open(self, entry: dict[str, Any]):
        path = self.root / entry["file"]
        if self.verify and entry["file"] not in self._verified:
            digest = file_sha256(path)
            if digest != entry["sha256"]:
                raise ActivationCacheError(f"shard {path} fails its sha256 check (corrupt); delete {self.root} "
                                           "to recompute")
            self._verified.add(entry["file"])
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise ActivationCacheError(f"shard {path} is not a readable safetensors file: {e}") from None

    def _read(self, key: str, entries: list[dict[str, Any]]) -> list[torch.Tensor]:
        out = []
        for entry in entries:
            with self._open(entry) as f:
                if key not in f.keys():
                    raise ActivationCacheError(f"shard {self.root / entry['file']} has no tensor {key!r}")
                out.append(f.get_tensor(key))
        return out

    def get(self, key: str) -> torch.Tensor:
        """One site's tensor over all rows (only this site is read from each shard)."""
        parts = self._read(key, self.index["shards"])
        if parts:
            return torch.cat(parts)
        shape = self.index["shapes"].get(key, [])
        return torch.empty(0, *shape, dtype=getattr(torch, self.index["dtype"]))

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
        if parts:
            return torch.cat(parts)
        return torch.empty(0, *self.index["shapes"][key], dtype=getattr(torch, self.index["dtype"]))
