"""The registry of intervention types: one :func:`register_method` call per method.

A method package (``intervene/methods/<name>/__init__.py``) registers everything the rest of the
library needs to know about its type in one call: the type name saved in diffs, the hook-time
class, its hyperparameter dataclass, how it bakes into weights (a baker, or the reason it cannot),
and its command-line subcommand. Nothing here imports a method: the core looks methods up by the
type name it finds in a diff, and a name that is not registered is an error, never an import.

>>> register_method("steering", Steering, bake=bake_steering)
>>> register_method("remedi", Remedi, config=RemediConfig, refuse="edits depend on the input", cli=remedi_cli)

Users add their own types the same way, or with the :func:`register` class decorator (no baker:
baking such a type raises ``NotBakeableError`` saying so).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from intervene.autoload import ensure_builtins
from intervene.errors import DiffFormatError, InterventionError, NotBakeableError
from intervene.intervention import Intervention
from intervene.sites import Site

# fn(intervention, {concrete site: Site}, editor): describe the edit to a bake.WeightEditor, or raise
Baker = Callable[[Intervention, Mapping[str, Site], Any], None]
# fn(subparsers): add the method's subcommand to the `intervene` command
CliRegistrar = Callable[[Any], None]
T = TypeVar("T", bound=type[Intervention])

NO_BAKER = ("no baker is registered for this type. Only edits that are the same at every position and do not "
            "depend on the input can live in the weights; if yours is one, pass bake=... to register_method")


@dataclass(frozen=True)
class MethodSpec:
    """Everything the library knows about one registered intervention type.

    Attributes:
        type_name: the name saved in diffs (``"iti"``).
        intervention: the :class:`~intervene.intervention.Intervention` subclass built at load time.
        config: the frozen dataclass of the method's hyperparameters (``None`` if it has none).
        bake: the baker, or ``None`` when the type cannot be baked (see ``refusal``).
        refusal: why the type cannot be baked (``None`` when it has a baker).
        cli: adds the method's ``intervene`` subcommand (``None``: no subcommand).
    """

    type_name: str
    intervention: type[Intervention]
    config: type | None = None
    bake: Baker | None = None
    refusal: str | None = None
    cli: CliRegistrar | None = None

    def baker(self) -> Baker:
        """The baker; for a type that cannot be baked, one that raises ``NotBakeableError`` with the reason."""
        if self.bake is not None:
            return self.bake
        reason = self.refusal or NO_BAKER

        def refuse(iv: Intervention, sites: Mapping[str, Site], editor: Any) -> None:
            raise NotBakeableError(f"{iv.name} ({self.type_name}): {reason}")

        return refuse


_METHODS: dict[str, MethodSpec] = {}


def register_method(type_name: str, intervention: type[Intervention], *, config: type | None = None,
                    bake: Baker | None = None, refuse: str | None = None,
                    cli: CliRegistrar | None = None) -> MethodSpec:
    """Register an intervention type (see the module docstring). Returns its :class:`MethodSpec`.

    Registering the same class again under its name is a no-op that replaces the entry (re-imports);
    another class under a taken name raises ``InterventionError``.
    """
    if not isinstance(intervention, type) or not issubclass(intervention, Intervention):
        raise InterventionError(f"{type_name}: {intervention!r} is not an Intervention subclass")
    if bake is not None and refuse is not None:
        raise InterventionError(f"{type_name}: give a baker or a refusal, not both")
    old = _METHODS.get(type_name)
    if old is not None and old.intervention is not intervention:
        raise InterventionError(f"intervention type {type_name!r} is already registered "
                                f"to {old.intervention.__qualname__}")
    intervention.type_name = type_name
    spec = MethodSpec(type_name, intervention, config, bake, refuse, cli)
    _METHODS[type_name] = spec
    return spec


def register(type_name: str) -> Callable[[T], T]:
    """Class decorator for your own types: ``@register("my_edit")`` (no baker, no CLI)."""

    def deco(cls: T) -> T:
        register_method(type_name, cls)
        return cls

    return deco


def registered_methods() -> dict[str, MethodSpec]:
    """A copy of the registry: type name -> :class:`MethodSpec`."""
    ensure_builtins()  # readers see the built-in types even if nothing imported a method yet
    return dict(_METHODS)


def registered_types() -> dict[str, type[Intervention]]:
    """Type name -> intervention class, for every registered type."""
    ensure_builtins()
    return {name: spec.intervention for name, spec in _METHODS.items()}


def method_spec(type_name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``type_name``; ``DiffFormatError`` for a name nothing registered."""
    ensure_builtins()
    try:
        return _METHODS[type_name]
    except KeyError:
        raise DiffFormatError(
            f"unknown intervention type {type_name!r}; registered: {sorted(_METHODS)}. "
            "If it is your own class, import the module that registers it before loading."
        ) from None


def lookup(type_name: str) -> type[Intervention]:
    """The class registered as ``type_name`` (``DiffFormatError`` if none is)."""
    return method_spec(type_name).intervention
