"""Writing files so that readers never see half of one, and saves that share a directory take turns.

* :func:`atomic_write` writes to a temporary name next to the target and renames it into place. The
  temporary file is created with ``O_CREAT | O_EXCL`` and mode ``0o666``, so the kernel applies the
  user's umask: saved files get the user's normal permissions (``mkstemp`` would give ``0600``, which
  a colleague on a shared machine cannot read). Data is fsynced before the rename, so a crash of the
  machine, not just of the process, leaves the old file or the new one.
* Temporary names are ``.{name}.{random}.tmp``. A process killed with ``kill -9`` cannot remove its
  own; :func:`sweep_temporaries` removes them, and every writer calls it (under :func:`dir_lock`)
  before it writes, so they never accumulate and are never read.
* :func:`dir_lock` is an advisory ``flock`` on the directory itself (no lock file to leave behind):
  exclusive for a save, shared for a load, so a load never sees a save half done. Where ``flock`` is
  not available the lock is a no-op, and the checksums the readers verify still refuse a mix.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


def temp_name(path: Path) -> Path:
    """A fresh temporary name next to ``path`` (hidden, recognisable by :func:`sweep_temporaries`)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}{TMP_SUFFIX}")


def _umask() -> int:
    """The process umask, read without changing it where the platform allows (Linux), else set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _create(tmp: Path) -> None:
    # O_EXCL: never follow or reuse anything already there; 0o666: the umask decides the permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], object], fsync: bool = True) -> None:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then rename it over ``path``.

    The rename is atomic on POSIX; on any error the temp file is removed and ``path`` is untouched.
    ``fsync=False`` skips flushing the data to the disk (for files that are cheap to recompute).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    _create(tmp)
    try:
        write(str(tmp))
        # Some writers (safetensors' save_file) recreate the file as 0600: give it the user's normal mode.
        os.chmod(tmp, 0o666 & ~_umask())
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes | str, fsync: bool = True) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically."""
    raw = data.encode() if isinstance(data, str) else data
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(raw), fsync=fsync)


def sweep_temporaries(directory: Path, names: Iterable[str]) -> list[Path]:
    """Remove the temporaries that killed writes of ``names`` left in ``directory``; returns them.

    A name ending in ``*`` is a prefix (``"shard-*"``: the temporaries of every shard). Call it only
    while holding :func:`dir_lock` exclusively: a concurrent writer's temporaries look the same as a
    dead one's.
    """
    removed: list[Path] = []
    wanted = tuple(f".{n[:-1]}" if n.endswith("*") else f".{n}." for n in names)
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for e in entries:
        if e.name.startswith(wanted) and e.name.endswith(TMP_SUFFIX) and e.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)
                removed.append(Path(e.path))
    return removed


@contextlib.contextmanager
def dir_lock(directory: Path, exclusive: bool) -> Iterator[None]:
    """Hold an advisory lock on ``directory`` (exclusive for writers, shared for readers).

    The lock is on the directory's own file descriptor, so nothing is created; the kernel releases it
    when the process dies, so a killed save never leaves the directory locked.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: the readers' checksums still refuse a mix
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError:  # e.g. a file system without flock: proceed unlocked
            pass
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
