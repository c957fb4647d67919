"""Named errors. Every failure a user can cause has its own class, so it can be caught precisely."""

from __future__ import annotations


class InterveneError(Exception):
    """Base class of every error this library raises on purpose."""


class SiteError(InterveneError, KeyError):
    """A site name does not resolve on this model (the message lists the valid names)."""

    def __str__(self) -> str:  # KeyError would repr() the message and escape its newlines
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(InterveneError):
    """The model's family is not in the site table (use ``intervene.register_family``)."""


class PositionsError(InterveneError, ValueError):
    """A positions spec is malformed or does not fit the batch."""


class InterventionError(InterveneError, ValueError):
    """An intervention was built or attached with inconsistent arguments."""


class DiffFormatError(InterveneError):
    """A saved diff is corrupt, truncated, of an unknown format version, or names an unknown type."""


class IncompatibleModelError(InterveneError):
    """A diff was made for a model whose shapes differ from the one it is being loaded onto."""


class DiffNotFoundError(InterveneError, FileNotFoundError):
    """No diff at that directory or Hub repo / revision."""


class NotBakeableError(InterveneError):
    """An intervention cannot be written into the weights exactly (the message says why)."""
