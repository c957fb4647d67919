"""Reading untrusted files: only regular files inside the directory we were given, in bounded amounts.

Every loader (diffs, probes, SAEs, caches, pyvene directories, GGUF files) reads through a
:class:`Root`. It

* refuses a path that leaves the directory: ``..`` components, absolute names, and symlinks whose
  target resolves outside it. The one exception is the Hugging Face cache, whose snapshot files are
  symlinks into the same repository's ``blobs/`` folder (``models--org--name/snapshots/REV/f ->
  ../../blobs/HASH``): there, a target directly inside that repository's ``blobs/`` is allowed;
* opens with ``O_NONBLOCK | O_NOFOLLOW`` and checks ``fstat`` before reading a byte, so a FIFO, a
  socket or a device (``/dev/zero``) is refused instead of hanging or streaming forever, and a path
  swapped for a symlink between the check and the open fails instead of being followed;
* reads at most ``max_bytes`` and turns every ``OSError`` (missing, unreadable, a directory) into the
  loader's own named error with the path in it;
* parses JSON with bounds: size, nesting depth (``RecursionError`` on 100k-deep nesting becomes a
  named error), integers of at most 20 digits, no ``NaN`` / ``Infinity`` / overflowing floats, no
  duplicate keys, no lone surrogates.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from intervene.errors import InterveneFileError

MAX_JSON_BYTES = 16 << 20  # far above any config we write; a bound, not a target
MAX_JSON_DEPTH = 64  # our formats nest a handful of levels; the C parser would recurse ~1000 deep
MAX_INT_DIGITS = 20  # every integer a format holds fits in 64 bits
_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) \
    | getattr(os, "O_NOCTTY", 0)
_HUB_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def hub_blobs_dir(real: Path) -> Path | None:
    """``<repo>/blobs`` when ``real`` lies in a Hugging Face cache snapshot (``<repo>/snapshots/<rev>/...``)."""
    parts = real.parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(_HUB_REPO_PREFIXES) and i + 1 < len(parts):
            return Path(*parts[:i]) / "blobs"
    return None


class Root:
    """A directory a loader was given; files are opened only inside it (see the module docstring).

    Args:
        path: the directory.
        error: the loader's error class (``DiffFormatError``...), raised for every refusal.
    """

    def __init__(self, path: str | os.PathLike[str], error: type[InterveneFileError]) -> None:
        self.path = Path(path)
        self.error = error
        try:
            self.real = Path(os.path.realpath(self.path, strict=True))
        except OSError as e:
            raise error.at(self.path, None, "a readable directory", note=e.strerror or str(e)) from None
        if not self.real.is_dir():
            raise error.at(self.path, None, "a directory", note="it is a file" if self.real.is_file() else "")
        self.blobs = hub_blobs_dir(self.real)

    # ---- paths -----------------------------------------------------------------------------------
    def check_name(self, rel: str, field: str | None = None) -> str:
        """``rel`` if it is a relative path that stays inside the directory by its components."""
        p = PurePosixPath(rel) if isinstance(rel, str) else None
        if p is None or not rel or "\0" in rel or "\\" in rel or p.is_absolute() \
                or any(c in ("", ".", "..") for c in rel.split("/")):
            raise self.error.at(self.path, field, "a file name inside the directory", rel)
        return rel

    def resolve(self, rel: str, field: str | None = None) -> Path:
        """The real path of ``rel``; refused when a symlink takes it outside the directory."""
        path = self.path / self.check_name(rel, field)
        real = Path(os.path.realpath(path))
        if real == self.real or self.real in real.parents:
            return real
        if self.blobs is not None and real.parent == self.blobs:
            return real
        raise self.error.at(path, field, "a file inside " + str(self.path),
                            note=f"a symlink to {real} outside it is refused")

    def _open(self, rel: str, field: str | None) -> tuple[int, os.stat_result, Path]:
        real = self.resolve(rel, field)
        where = self.path / rel
        try:
            fd = os.open(real, _FLAGS)
        except OSError as e:
            raise self.error.at(where, field, "a readable regular file", note=e.strerror or str(e)) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise self.error.at(where, field, "a regular file", note=f"it is {_kind(st.st_mode)}")
        return fd, st, where

    def kind(self, rel: str) -> str | None:
        """``"file"``, ``"dir"``, ``None`` (missing) or ``"other"``, without following symlinks outside."""
        try:
            real = self.resolve(rel)
            st = os.stat(real)
        except (InterveneFileError, OSError):
            return "other" if os.path.lexists(self.path / rel) else None
        return "file" if stat.S_ISREG(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "other"

    def is_file(self, rel: str) -> bool:
        return self.kind(rel) == "file"

    def listdir(self, rel: str = "", limit: int = 100_000) -> list[str]:
        """Sorted names in a subdirectory (``""``: the root); at most ``limit`` of them."""
        d = self.real if not rel else self.resolve(rel)
        try:
            with os.scandir(d) as it:
                names = []
                for e in it:
                    names.append(e.name)
                    if len(names) > limit:
                        raise self.error.at(self.path / rel, None, f"at most {limit} entries")
        except OSError as e:
            raise self.error.at(self.path / rel, None, "a readable directory", note=e.strerror or str(e)) from None
        return sorted(names)

    # ---- reading ---------------------------------------------------------------------------------
    def size(self, rel: str, field: str | None = None) -> int:
        fd, st, _ = self._open(rel, field)
        os.close(fd)
        return st.st_size

    def exists(self, rel: str) -> bool:
        """Whether anything (even a dangling symlink) is at ``rel``; reading it may still be refused."""
        return os.path.lexists(self.path / self.check_name(rel))

    def read_bytes(self, rel: str, max_bytes: int, field: str | None = None) -> bytearray:
        """The whole of ``rel`` (at most ``max_bytes``; larger files are refused before reading)."""
        fd, st, where = self._open(rel, field)
        try:
            if st.st_size > max_bytes:
                raise self.error.at(where, field, f"at most {max_bytes} bytes", note=f"it has {st.st_size}")
            return _read_exactly(fd, 0, st.st_size, self.error, where, field)
        finally:
            os.close(fd)

    def read_range(self, rel: str, offset: int, length: int, field: str | None = None) -> bytearray:
        """``length`` bytes of ``rel`` from ``offset`` (refused when the file is shorter)."""
        fd, st, where = self._open(rel, field)
        try:
            if offset < 0 or length < 0 or offset + length > st.st_size:
                raise self.error.at(where, field, f"bytes {offset}..{offset + length}", note=f"the file has {st.st_size}")
            return _read_exactly(fd, offset, length, self.error, where, field)
        finally:
            os.close(fd)

    def open_file(self, rel: str, max_bytes: int, field: str | None = None) -> Any:
        """A binary file object for a checked regular file (for readers that need one, e.g. ``np.memmap``)."""
        fd, st, where = self._open(rel, field)
        if st.st_size > max_bytes:
            os.close(fd)
            raise self.error.at(where, field, f"at most {max_bytes} bytes", note=f"it has {st.st_size}")
        return os.fdopen(fd, "rb")

    def read_json(self, rel: str, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH,
                  field: str | None = None) -> Any:
        """Parse ``rel`` as bounded JSON (see :func:`parse_json`)."""
        return parse_json(self.read_bytes(rel, max_bytes, field), self.error, self.path / rel, max_depth)


def _read_exactly(fd: int, offset: int, length: int, error: type[InterveneFileError], where: Path,
                  field: str | None) -> bytearray:
    buf = bytearray(length)
    view, done = memoryview(buf), 0
    while done < length:
        try:
            n = os.preadv(fd, [view[done:]], offset + done) if hasattr(os, "preadv") else \
                _pread_into(fd, view[done:], offset + done)
        except OSError as e:
            raise error.at(where, field, "a readable regular file", note=e.strerror or str(e)) from None
        if n == 0:
            raise error.at(where, field, f"{length} bytes", note="the file shrank while it was read")
        done += n
    return buf


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


# ---- bounded JSON ------------------------------------------------------------------------------
class _Reject(Exception):
    def __init__(self, field: str | None, expected: str, got: Any = ...) -> None:
        super().__init__(expected)
        self.field, self.expected, self.got = field, expected, got


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Reject(None, f"integers of at most {MAX_INT_DIGITS} digits", text[:30] + "...")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Reject(None, "finite numbers", text[:30])
    return value


def _parse_constant(text: str) -> float:
    raise _Reject(None, "JSON (NaN and Infinity are not JSON)", text)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Reject(None, "unique keys", k)
        out[k] = v
    return out


def _check_tree(value: Any, max_depth: int) -> None:
    """Depth bound and no lone surrogates (``"\\ud800"`` is valid JSON but not valid text), iteratively."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            _check_text(v)
        elif isinstance(v, (dict, list)):
            if depth > max_depth:
                raise _Reject(None, f"nesting at most {max_depth} deep")
            if isinstance(v, dict):
                for k, item in v.items():
                    _check_text(k)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in v)


def _check_text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _Reject(None, "valid text (a lone surrogate escape is not)", s) from None


def parse_json(data: bytes | bytearray, error: type[InterveneFileError], where: str | os.PathLike[str] | None,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``data`` as JSON, or ``error`` naming ``where`` (see the module docstring for the bounds)."""
    try:
        text = data.decode("utf-8")
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant,
                           object_pairs_hook=_pairs)
        _check_tree(value, max_depth)
        return value
    except _Reject as r:
        raise error.at(where, r.field, r.expected, r.got) from None
    except UnicodeDecodeError as e:
        raise error.at(where, None, "UTF-8 text", note=str(e)) from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): corrupt or truncated",
                    path=where, expected="valid JSON") from None
    except RecursionError:
        raise error.at(where, None, f"nesting at most {max_depth} deep") from None
    except ValueError as e:  # what else the parser may raise on hostile input
        raise error.at(where, None, "valid JSON", note=str(e)[:100]) from None
