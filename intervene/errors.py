"""Every error class intervene raises on purpose, in one place.

All derive from :class:`InterveneError`, so ``except InterveneError`` catches exactly what the library
raises deliberately; where a builtin says the same thing (a missing file, a bad value) the class also
derives from it, so code written against the builtin keeps working. Subsystems re-export the classes
their users import from them (``intervene.probes.ProbeFormatError``, ``intervene.features.SAEFormatError``).
"""

from __future__ import annotations

import os
from typing import Any, TypeVar


class InterveneError(Exception):
    """Base class of every error this library raises on purpose."""


def show(value: Any, limit: int = 60) -> str:
    """A short, one-line, escaped rendering of a value read from a file, for an error message.

    ``repr`` escapes newlines and control characters, so a hostile string cannot forge extra lines
    in a log or terminal; long values are cut so a megabyte-long key does not become the message.
    """
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class InterveneFileError(InterveneError):
    """Base of every error a user's file can cause: it names the file, the field and what was expected.

    Attributes:
        path: the file (or directory) at fault, when known.
        field: where in it (``interventions[0].params.scale``, a tensor name, ``header``), when known.
        expected: what the format requires there, when known.

    The message is one line: ``{path}: {field}: expected {expected}, got {value}``; subclasses also
    derive from the builtin that says the same (``ValueError``), so older ``except`` clauses still work.
    """

    def __init__(self, message: str = "", *, path: str | os.PathLike[str] | None = None, field: str | None = None,
                 expected: str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)
        self.field = field
        self.expected = expected

    @classmethod
    def at(cls: type[E], path: str | os.PathLike[str] | None, field: str | None, expected: str,
           got: Any = ..., note: str = "") -> E:
        """The error for ``field`` of ``path``: ``expected`` there, ``got`` found (omitted when ``...``)."""
        return cls(expectation(path, field, expected, got, note), path=path, field=field, expected=expected)

    def __reduce__(self) -> tuple[Any, ...]:  # keyword-only attributes survive pickling (multiprocessing)
        return (_rebuild, (type(self), self.args, self.path, self.field, self.expected))


E = TypeVar("E", bound=InterveneFileError)


def expectation(path: str | os.PathLike[str] | None, field: str | None, expected: str, got: Any = ...,
                note: str = "") -> str:
    """``{path}: {field}: expected {expected}, got {got} ({note})``, the parts that are given."""
    where = ": ".join(str(p) for p in (None if path is None else os.fspath(path), field) if p)
    msg = f"{where}: expected {expected}" if where else f"expected {expected}"
    if got is not ...:
        msg += f", got {show(got)}"
    return msg + (f" ({note})" if note else "")


def file_error(cls: type[Exception], path: str | os.PathLike[str] | None, field: str | None, expected: str,
               got: Any = ..., note: str = "") -> Exception:
    """``cls.at(...)`` for a file error class; for another class (``InterventionError`` in a method's
    ``from_saved``) the same one-line message, which the loader prefixes with the file."""
    if isinstance(cls, type) and issubclass(cls, InterveneFileError):
        return cls.at(path, field, expected, got, note)
    return cls(expectation(path, field, expected, got, note))


def _rebuild(cls: type[InterveneFileError], args: tuple[Any, ...], path: str | None, field: str | None,
             expected: str | None) -> InterveneFileError:
    err = cls(*args)
    err.path, err.field, err.expected = path, field, expected
    return err


# ---- sites, positions, interventions (the core) -------------------------------------------------
class SiteError(InterveneError, KeyError):
    """A site name does not resolve on this model (the message lists the valid names)."""

    def __str__(self) -> str:  # KeyError would repr() the message and escape its newlines
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(InterveneError, ValueError):
    """The model's structure cannot be resolved (use raw module paths or ``intervene.register_family``)."""


class PositionsError(InterveneError, ValueError):
    """A positions spec is malformed or does not fit the batch."""


class InterventionError(InterveneError, ValueError):
    """An intervention was built or attached with inconsistent arguments."""


class NotBakeableError(InterveneError):
    """An intervention cannot be written into the weights exactly (the message says why)."""


# ---- files: diffs, probes, SAEs, caches ---------------------------------------------------------
class DiffFormatError(InterveneFileError, ValueError):
    """A saved diff is corrupt, truncated, of an unknown format version, or names an unknown type."""


class IncompatibleModelError(InterveneFileError, ValueError):
    """A diff was made for a model whose shapes differ from the one it is being loaded onto."""


class DiffNotFoundError(InterveneFileError, FileNotFoundError):
    """No diff at that directory or Hub repo / revision."""


class ProbeFormatError(InterveneFileError, ValueError):
    """A saved probe is corrupt, truncated, inconsistent, or names an unregistered probe type."""


class ProbeNotFoundError(InterveneFileError, FileNotFoundError):
    """No probe at that path."""


class ProbeNotFittedError(InterveneError, AttributeError):
    """A method that needs learned attributes was called before ``fit``."""


class SAEFormatError(InterveneFileError, ValueError):
    """An SAE's files are in an unknown layout, inconsistent, or do not fit the model's site."""


class ActivationCacheError(InterveneFileError, ValueError):
    """An activation cache is corrupt, truncated, incomplete, or was written for other inputs."""


class LatentCacheError(InterveneFileError, ValueError):
    """A latent cache is missing, corrupt, or was written with different settings."""


class CheckpointError(InterveneError, ValueError):
    """A training checkpoint is incomplete, corrupt, or was written for another run (config, tensors, data)."""


class InteropError(InterveneFileError, InterventionError):
    """A pyvene directory or a GGUF control vector holds something with no exact intervene equivalent, or that
    does not fit the model (an ``InterventionError`` that also names the file and field)."""


class UncheckedFileWarning(UserWarning):
    """A file was loaded without an integrity check (a format version that records no checksum)."""


# ---- data and services --------------------------------------------------------------------------
class DatasetUnavailableError(InterveneError, OSError):
    """A dataset cannot be loaded (missing file, not cached while offline, ``datasets`` not installed)."""


class TemplateError(InterveneError, ValueError):
    """A template is malformed, or a row lacks a field it needs."""


class ClientError(InterveneError, RuntimeError):
    """A client request failed for good (after retries), or its answer was malformed."""
