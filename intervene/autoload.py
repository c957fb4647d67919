"""Registering the built-in methods on first need, so that ``import intervene`` stays cheap.

``import intervene`` imports nothing heavy (the top-level package is lazy, PEP 562), so the
``intervene`` command can list its subcommands without importing torch. The built-in intervention
types are registered when ``intervene.methods`` is imported; anything that *reads* the registry
(loading a diff, baking, ``registered_types()``) must see them even when the caller never touched a
method, e.g. ``from intervene.intervenable import Intervenable; Intervenable.load(...)``.

The registry sits in the core and may not import the methods (docs/architecture.md, "Layers").
So the top-level package, which may import everything, hands this foundation module a loader at
import time, and the registry calls :func:`ensure_builtins` before every read. The loader is a
fixed function of ours (``import intervene.methods``): no module name is ever read from a file or
the environment.
"""

from __future__ import annotations

from collections.abc import Callable

_loader: Callable[[], None] | None = None
_state = "pending"  # "pending" -> "loading" -> "done"


def set_builtin_loader(loader: Callable[[], None]) -> None:
    """Install the function that registers the built-in methods (called by ``intervene/__init__.py``)."""
    global _loader
    _loader = loader


def ensure_builtins() -> None:
    """Register the built-in methods once; a no-op while they are being registered (re-entrant)."""
    global _state
    if _state != "pending" or _loader is None:
        return
    _state = "loading"
    try:
        _loader()
    except BaseException:
        _state = "pending"  # an interrupted import may be retried
        raise
    _state = "done"
