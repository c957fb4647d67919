"""What every ``intervene`` subcommand shares: one-line errors, model loading, options from a method's config.

A module of its own (not inside ``intervene/cli``) because method packages add subcommands too, and a
method must not import the application layer (docs/architecture.md, "Layers").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from intervene.errors import InterveneError, InterveneFileError


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
            print(f"{name}: error: {one_line(e)}", file=sys.stderr)
            return 1

    return run


def one_line(e: BaseException) -> str:
    """An error as one line: its class for our file errors (they name file, field and expectation), newlines
    and control characters folded so nothing read from a file can forge extra lines on the terminal."""
    text = str(e) or type(e).__name__
    if isinstance(e, InterveneFileError):
        text = f"{type(e).__name__}: {text}"
    return "".join(c if c.isprintable() else " " for c in " ".join(text.split()))


def load_model_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from the ``model``/``dtype``/``device`` arguments (``demo`` allowed)."""
    from intervene.assets import load_model

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


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, exclude: tuple[str, ...] = (),
                         defaults: dict[str, Any] | None = None) -> None:
    """One ``--option`` per field of a method's hyperparameter dataclass (see :mod:`intervene.hparams`).

    The help text, default, type and choices come from the field, so the CLI never repeats a default.
    ``defaults`` overrides a field's default for this command only (e.g. a sweep's own defaults).
    """
    import typing

    from intervene.hparams import hparam_fields

    hints = typing.get_type_hints(config_cls)
    for f in hparam_fields(config_cls):
        if f.name in exclude or not f.metadata.get("cli", True):
            continue
        default = (defaults or {}).get(f.name, f.default)
        kind = hints.get(f.name)
        help_text = f"{f.metadata.get('help', '')} (default {default})"
        choices = f.metadata.get("choices")
        if kind is bool:
            parser.add_argument(_option(f.name), dest=f.name, default=default, help=help_text,
                                action=argparse.BooleanOptionalAction)
            continue
        args = typing.get_args(kind)
        base = kind if kind in (int, float, str) else next((a for a in args if a in (int, float, str)), str)
        parser.add_argument(_option(f.name), dest=f.name, type=base, default=default, choices=choices, help=help_text)


def config_from_args(config_cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The hyperparameter dataclass filled from parsed ``args`` (fields the parser lacks keep their defaults)."""
    from intervene.hparams import hparam_fields

    values = {f.name: getattr(args, f.name) for f in hparam_fields(config_cls) if hasattr(args, f.name)}
    values.update(overrides)
    return config_cls(**values)
