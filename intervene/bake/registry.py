"""The baker registry: intervention type name -> function that describes its weight edit.

Polymorphism, not a type switch: an intervention bakes through ``register_baker(type_name)`` or
by defining ``bake_into(editor, sites)`` on its class. Types without either are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from intervene.errors import NotBakeableError
from intervene.intervention import Intervention
from intervene.sites import Site

if TYPE_CHECKING:
    from intervene.bake.editor import WeightEditor

Baker = Callable[[Intervention, Mapping[str, Site], "WeightEditor"], None]
_BAKERS: dict[str, Baker] = {}


def register_baker(type_name: str) -> Callable[[Baker], Baker]:
    """Decorator: ``fn(intervention, {site: Site}, editor)`` bakes interventions of ``type_name``."""

    def deco(fn: Baker) -> Baker:
        _BAKERS[type_name] = fn
        return fn

    return deco


def refuse(type_name: str, reason: str) -> None:
    """Register a baker that always refuses ``type_name`` with ``reason``."""

    def baker(iv: Intervention, sites: Mapping[str, Site], editor: WeightEditor) -> None:
        raise NotBakeableError(f"{iv.name} ({type_name}): {reason}")

    _BAKERS[type_name] = baker


def baker_for(iv: Intervention) -> Baker:
    """The baker of ``iv``: its class's ``bake_into`` method, else the one registered for its type name."""
    method = getattr(type(iv), "bake_into", None)
    if method is not None:
        return lambda iv_, sites, editor: method(iv_, editor, sites)
    fn = _BAKERS.get(iv.type_name)
    if fn is None:
        raise NotBakeableError(
            f"{iv.name} ({iv.type_name}): no baker for this intervention type. Only edits that are the same at "
            "every position and do not depend on the input can live in the weights; if yours is one, register a "
            "baker with intervene.bake.register_baker")
    return fn
