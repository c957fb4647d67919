"""The registry of probe types: what :func:`intervene.probes.load_probe` may build from a saved ``type``.

Classes are found only here, by the registered name, so a file can never make us import anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from intervene.errors import ProbeFormatError

C = TypeVar("C", bound=type)

_REGISTRY: dict[str, type] = {}


def register_probe(name: str) -> Callable[[C], C]:
    """Class decorator: make ``cls`` loadable by :func:`intervene.probes.load_probe` as ``name``."""

    def deco(cls: C) -> C:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"probe type {name!r} is already registered to {_REGISTRY[name].__name__}")
        cls.probe_type = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registered_probes() -> dict[str, type]:
    """A copy of the registry: probe type name -> class."""
    return dict(_REGISTRY)


def lookup_probe(name: str) -> type:
    """The class registered as ``name``; raises :class:`ProbeFormatError` if there is none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ProbeFormatError(
            f"unknown probe type {name!r}; registered: {sorted(_REGISTRY)}. If it is your own class, "
            "import the module that registers it before loading."
        ) from None
