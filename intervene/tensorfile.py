"""Reading safetensors files we were handed, with every header field checked before a byte is used.

The reader is ours (on top of :class:`~intervene.safeio.Root`) rather than ``safetensors.safe_open``,
because it must (1) open only checked regular files inside the given directory, (2) hash exactly the
bytes it parses (the diff and cache checksums), and (3) answer every malformed header with the
loader's named error. It checks what the format requires: an 8-byte header length within the file,
a JSON object of entries with known dtypes and shapes, offsets that tile the data section exactly
(no gaps, overlaps or trailing bytes) with ``prod(shape) * itemsize`` bytes each, and string-only
metadata. Nothing is allocated in proportion to a declared size before it is checked against the
file's real size. Files are still *written* with the ``safetensors`` library.

:func:`check_tensor` holds the checks formats apply to the tensors themselves: floating where floats
are meant (integer, bool and float8 tensors are refused), finite, of the expected shape.
"""

from __future__ import annotations

import hashlib
import math
import struct
import sys
from dataclasses import dataclass
from typing import Any

import torch

from intervene.errors import InterveneFileError, file_error
from intervene.safeio import Root, parse_json
from intervene.schemas.base import validate
from intervene.schemas.tensors import DTYPES, MAX_NAME, MAX_TENSORS, TensorEntry

MAX_HEADER = 100 << 20  # the safetensors library's own limit
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHUNK = 1 << 24  # elements per finiteness check, so a large tensor needs no full-size boolean mask


@dataclass(frozen=True)
class TensorInfo:
    """A header entry, checked: ``start``/``end`` are absolute offsets in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    size: int  # the file's size in bytes


def parse_header(prefix: bytes | bytearray, file_size: int, error: type[InterveneFileError], where: Any) -> Header:
    """Check and parse the header at the start of a safetensors file of ``file_size`` bytes.

    ``prefix`` holds at least the first ``8 + header length`` bytes (or the whole file).
    """
    if file_size < 8 or len(prefix) < 8:
        raise error.at(where, "header", "a safetensors file (8-byte header length first)",
                       note=f"the file has {file_size} bytes: truncated")
    (n,) = struct.unpack("<Q", bytes(prefix[:8]))
    if n > MAX_HEADER or 8 + n > file_size:
        raise error.at(where, "header", f"a header length within the file (at most {min(MAX_HEADER, file_size - 8)})",
                       n, note="corrupt or truncated")
    if len(prefix) < 8 + n:
        raise error.at(where, "header", f"{8 + n} header bytes", note=f"only {len(prefix)} given")
    raw = prefix[8:8 + n]
    if not raw.startswith(b"{"):
        raise error.at(where, "header", "a JSON object", bytes(raw[:20]))
    obj = parse_json(raw, error, where, max_depth=4)
    if not isinstance(obj, dict):
        raise error.at(where, "header", "a JSON object", obj)
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise error.at(where, "header.__metadata__", "an object of strings", meta)
    if len(obj) > MAX_TENSORS:
        raise error.at(where, "header", f"at most {MAX_TENSORS} tensors", note=f"it declares {len(obj)}")
    data_start, data_len = 8 + n, file_size - 8 - n
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, raw_entry in obj.items():
        field = f"header[{name!r}]" if len(name) <= 80 else "header[<a long name>]"
        if not name or len(name) > MAX_NAME:
            raise error.at(where, field, f"a tensor name of 1 to {MAX_NAME} characters", name)
        entry = validate(TensorEntry, raw_entry, error, where, field)
        if entry.dtype not in DTYPES:
            raise error.at(where, f"{field}.dtype", f"one of {sorted(DTYPES)}", entry.dtype)
        dtype = getattr(torch, DTYPES[entry.dtype])
        a, b = entry.data_offsets
        nbytes = math.prod(entry.shape) * dtype.itemsize  # Python ints: no overflow
        if not a <= b <= data_len or b - a != nbytes:
            raise error.at(where, f"{field}.data_offsets", f"{nbytes} bytes inside the {data_len}-byte data section",
                           [a, b], note="corrupt or truncated")
        infos[name] = TensorInfo(dtype, tuple(entry.shape), data_start + a, data_start + b)
        spans.append((a, b, name))
    spans.sort()
    pos = 0
    for a, b, name in spans:  # the entries must tile the data section: no gap, overlap or trailing bytes
        if a != pos:
            raise error.at(where, "header", "tensors that tile the data section",
                           note=f"{name!r} starts at {a}, expected {pos}: corrupt or hand-edited")
        pos = b
    if pos != data_len:
        raise error.at(where, "header", f"tensors covering all {data_len} data bytes",
                       note=f"they cover {pos}: truncated, padded or corrupt")
    return Header(infos, dict(meta), file_size)


def _tensor(buf: bytearray, base: int, info: TensorInfo, offset: int, error: type[InterveneFileError],
            where: Any, name: str) -> torch.Tensor:
    """The tensor at ``buf[info.start - offset : info.end - offset]`` (a view when aligned, else a copy)."""
    if sys.byteorder != "little":  # safetensors is little-endian; torch reads native order
        raise error.at(where, name, "a little-endian host", note="big-endian hosts are not supported")
    count = math.prod(info.shape)
    if count == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    lo = info.start - offset
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=info.end - info.start, offset=lo)
    if info.dtype == torch.bool and bool((raw > 1).any()):
        raise error.at(where, name, "bool bytes of 0 or 1", note="corrupt")
    if (base + lo) % info.dtype.itemsize:
        raw = raw.clone()  # misaligned for its element type: copy into a fresh (aligned) allocation
    return raw.view(info.dtype).reshape(info.shape)


def _base(buf: bytearray) -> int:
    return torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr() if len(buf) else 0


def load_tensors(root: Root, rel: str, max_bytes: int = 1 << 42, digest: bool = False,
                 field: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str], str | None]:
    """Every tensor of ``root/rel``: ``(tensors, metadata, sha256 hex or None)``, the file read once."""
    buf = root.read_bytes(rel, max_bytes, field)
    where = root.path / rel
    sha = hashlib.sha256(buf).hexdigest() if digest else None
    header = parse_header(buf, len(buf), root.error, where)
    base = _base(buf)
    tensors = {name: _tensor(buf, base, info, 0, root.error, where, name) for name, info in header.tensors.items()}
    return tensors, header.metadata, sha


def read_header(root: Root, rel: str, field: str | None = None) -> Header:
    """Only the header of ``root/rel`` (two small reads)."""
    size = root.size(rel, field)
    where = root.path / rel
    first = root.read_range(rel, 0, min(8, size), field)
    if size < 8:
        parse_header(first, size, root.error, where)  # raises: truncated
    (n,) = struct.unpack("<Q", bytes(first))
    if n > MAX_HEADER or 8 + n > size:
        parse_header(first, size, root.error, where)  # raises with the message about the length
    return parse_header(first + root.read_range(rel, 8, n, field), size, root.error, where)


def read_slice(root: Root, rel: str, header: Header, name: str, lo: int, hi: int) -> torch.Tensor:
    """Rows ``lo:hi`` of a tensor named in ``header`` (read from disk alone; ``lo``/``hi`` are clamped)."""
    info = header.tensors[name]
    rows = info.shape[0] if info.shape else 1
    lo, hi = max(0, min(lo, rows)), max(0, min(hi, rows))
    hi = max(lo, hi)
    row_bytes = (info.end - info.start) // rows if rows else 0
    start = info.start + lo * row_bytes
    part = TensorInfo(info.dtype, (hi - lo, *info.shape[1:]), start, start + (hi - lo) * row_bytes)
    buf = root.read_range(rel, part.start, part.end - part.start)
    return _tensor(buf, _base(buf), part, part.start, root.error, root.path / rel, name)


# ---- what formats require of the tensors themselves ----------------------------------------------
def is_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite (checked in chunks: no full-size mask for a large tensor)."""
    if not t.is_floating_point():
        return True
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + _CHUNK]).all()) for i in range(0, flat.numel(), _CHUNK))


def check_tensor(t: Any, error: type[Exception], where: Any, field: str, shape: tuple[int | None, ...] | None = None,
                 floating: bool = True, finite: bool = True) -> torch.Tensor:
    """``t`` if it is a tensor of a floating dtype (float16/bfloat16/float32/float64), with finite values
    and the given ``shape`` (``None`` entries match any size); else ``error`` naming ``field``."""
    if not isinstance(t, torch.Tensor):
        raise file_error(error, where, field, "a tensor", type(t).__name__)
    if floating and t.dtype not in FLOAT_DTYPES:
        raise file_error(error, where, field, "a floating tensor (float16, bfloat16, float32 or float64)",
                         str(t.dtype).removeprefix("torch."))
    if t.is_complex():
        raise file_error(error, where, field, "a real tensor", str(t.dtype))
    if shape is not None and (len(shape) != t.ndim or any(w is not None and w != s for w, s in zip(shape, t.shape))):
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise file_error(error, where, field, f"shape {want}", list(t.shape))
    if finite and not is_finite(t):
        raise file_error(error, where, field, "finite values", note="it holds NaN or Inf")
    return t


def file_sha256(root: Root, rel: str) -> str:
    """The sha256 of a file read through ``root`` (streamed in 16 MiB pieces)."""
    size = root.size(rel)
    h = hashlib.sha256()
    for lo in range(0, size, 1 << 24):
        h.update(root.read_range(rel, lo, min(1 << 24, size - lo)))
    return h.hexdigest()


__all__ = ["FLOAT_DTYPES", "Header", "TensorInfo", "check_tensor", "file_sha256", "is_finite", "load_tensors",
           "parse_header", "read_header", "read_slice"]
