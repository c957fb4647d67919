"""Every error class intervene raises on purpose, in one place.

All derive from :class:`InterveneError`, so ``except InterveneError`` catches exactly what the library
raises deliberately; where a builtin says the same thing (a missing file, a bad value) the class also
derives from it, so code written against the builtin keeps working. Subsystems re-export the classes
their users import from them (``intervene.probes.ProbeFormatError``, ``intervene.features.SAEFormatError``).
"""

from __future__ import annotations


class InterveneError(Exception):
    """Base class of every error this library raises on purpose."""


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
class DiffFormatError(InterveneError, ValueError):
    """A saved diff is corrupt, truncated, of an unknown format version, or names an unknown type."""


class IncompatibleModelError(InterveneError, ValueError):
    """A diff was made for a model whose shapes differ from the one it is being loaded onto."""


class DiffNotFoundError(InterveneError, FileNotFoundError):
    """No diff at that directory or Hub repo / revision."""


class ProbeFormatError(InterveneError, ValueError):
    """A saved probe is corrupt, truncated, inconsistent, or names an unregistered probe type."""


class ProbeNotFittedError(InterveneError, AttributeError):
    """A method that needs learned attributes was called before ``fit``."""


class SAEFormatError(InterveneError, ValueError):
    """An SAE's files are in an unknown layout, inconsistent, or do not fit the model's site."""


class ActivationCacheError(InterveneError, ValueError):
    """An activation cache is corrupt, truncated, incomplete, or was written for other inputs."""


class LatentCacheError(InterveneError, ValueError):
    """A latent cache is missing, corrupt, or was written with different settings."""


class CheckpointError(InterveneError, ValueError):
    """A training checkpoint is incomplete, corrupt, or was written for another run (config, tensors, data)."""


# ---- data and services --------------------------------------------------------------------------
class DatasetUnavailableError(InterveneError, OSError):
    """A dataset cannot be loaded (missing file, not cached while offline, ``datasets`` not installed)."""


class TemplateError(InterveneError, ValueError):
    """A template is malformed, or a row lacks a field it needs."""


class ClientError(InterveneError, RuntimeError):
    """A client request failed for good (after retries), or its answer was malformed."""
