"""Pieces every subcommand module shares."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from intervene.errors import InterveneError


def guard(fn: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    """Named library errors become one line on stderr and exit code 1, not a traceback.

    ``OSError`` is included because transformers raises it for a model path or hub id that does not
    exist (and for unreadable files), the most common mistake on a command line.
    """

    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args) or 0)
        except (InterveneError, OSError, ValueError) as e:
            command = getattr(args, "command", None) or ""
            sub = getattr(args, f"{command}_command", None)
            name = " ".join(p for p in ("intervene", command, sub) if p)
            print(f"{name}: error: {e}", file=sys.stderr)
            return 1

    return run


def load_model_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from the ``model``/``dtype``/``device`` arguments (``demo`` allowed)."""
    from intervene.elicit import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device)


def load_single(diff: str, model: Any, cls: type, what: str, alpha: float | None = None) -> Any:
    """The one intervention of type ``cls`` in the diff at ``diff``, loaded detached onto ``model``.

    ``alpha`` (when given) overrides its strength; a diff with none or several of them is a ``ValueError``.
    """
    from intervene.intervenable import Intervenable

    found = [iv for iv in Intervenable.load(diff, model, attach=False).interventions if isinstance(iv, cls)]
    if len(found) != 1:
        raise ValueError(f"{diff} holds {len(found)} {what}; expected one")
    if alpha is not None:
        found[0].alpha = alpha
    return found[0]
