"""Hyperparameter dataclasses: one source for a method's defaults, its CLI options and its saved metadata.

A method's ``config.py`` declares a frozen dataclass whose fields are made with :func:`hparam`, so
each field carries its help text (the docstring of that field). The CLI builds its options from
it (:func:`intervene.command.add_config_arguments`), fitting records :func:`as_dict` of it in
``fit_info_`` and in the diff, and nothing repeats a default.

>>> @dataclass(frozen=True)
... class ITIConfig:
...     num_heads: int = hparam(48, "K: how many heads to shift")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


def hparam(default: Any, help: str, *, choices: Sequence[Any] | None = None, cli: bool = True) -> Any:
    """A dataclass field with a help text (and, for the CLI, allowed ``choices``; ``cli=False`` hides it)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "cli": cli})


def hparam_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a hyperparameter dataclass, in declaration order."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    return list(dataclasses.fields(cls))


def as_dict(cfg: Any) -> dict[str, Any]:
    """The config as a JSON-able dict (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def make_config(cls: type, base: Any = None, **overrides: Any) -> Any:
    """``base`` (or the defaults) with ``overrides``; an unknown name is a ``TypeError`` naming the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} hyperparameter(s) {unknown}; valid: {sorted(names)}")
    return dataclasses.replace(base if base is not None else cls(), **overrides)


def describe(cls: type) -> list[tuple[str, Any, str]]:
    """``(name, default, help)`` for each field: what a card or ``--help`` shows."""
    return [(f.name, f.default, f.metadata.get("help", "")) for f in hparam_fields(cls)]
