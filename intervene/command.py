"""What every ``intervene`` subcommand shares: one-line errors, model loading, progress, options from a config.

A module of its own (not inside ``intervene/cli``) because method packages add subcommands too, and a
method must not import the application layer (docs/architecture.md, "Layers").

Every failure a user can cause or fix ends as one line on stderr, ``intervene <cmd>: error: <what
happened; what to do>``, and exit code 1 (argparse's usage errors keep their own exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from intervene.errors import InterveneError, InterveneFileError

# Exceptions of the HTTP stack under huggingface_hub / transformers (httpx, requests, urllib3), matched
# by module so that nothing here imports them (--help stays fast).
_NETWORK_MODULES = ("httpx", "httpcore", "requests", "urllib3")
HUB_HINT = "check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use only the local cache"
LOGIN_HINT = "run `hf auth login`, set HF_TOKEN, or pass --token"


def command_name(args: argparse.Namespace) -> str:
    """``"intervene iti fit"`` for the parsed ``args`` of ``intervene iti fit ...``."""
    command = getattr(args, "command", None) or ""
    sub = getattr(args, f"{command}_command", None)
    return " ".join(p for p in ("intervene", command, sub) if p)


def one_line(text: object) -> str:
    """``text`` (often an error) on one line: the messages of transformers and huggingface_hub span several,
    and newlines or control characters read from a file must not forge extra lines on the terminal. Our file
    errors keep their class name (they name the file, the field and what was expected)."""
    words = str(text) or type(text).__name__
    if isinstance(text, InterveneFileError):
        words = f"{type(text).__name__}: {words}"
    return "".join(c if c.isprintable() else " " for c in " ".join(words.split()))


def error_message(e: BaseException) -> str | None:
    """The one-line report of an error a user can fix, or ``None`` for a bug (which keeps its traceback)."""
    name = type(e).__name__
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    if name in ("RepositoryNotFoundError", "GatedRepoError"):
        where = f" at {response.url}" if getattr(response, "url", None) else ""
        return f"the Hub has no repo{where}, or it is private or gated; {LOGIN_HINT}"
    if name == "RevisionNotFoundError":
        return f"the Hub repo has no such revision ({one_line(e).split('.')[0]})"
    if name == "OfflineModeIsEnabled":
        return f"HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset it to go online ({one_line(e)})"
    if status in (401, 403):
        return f"the Hub refused the request (HTTP {status}: not logged in, or no write access); {LOGIN_HINT}"
    if isinstance(status, int):
        return f"the Hub answered HTTP {status} ({one_line(e)[:160]}); try again later, or {HUB_HINT}"
    network = type(e).__module__.startswith(_NETWORK_MODULES) or isinstance(e, (ConnectionError, TimeoutError))
    if network and not isinstance(e, InterveneError):
        return f"could not reach the Hugging Face Hub ({name}: {one_line(e)}); {HUB_HINT}"
    if isinstance(e, (InterveneError, OSError, ValueError)):
        return one_line(e)
    return None


def run_guarded(fn: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """``fn(args)`` as an exit code; a fixable error becomes one line on stderr and code 1."""
    try:
        return int(fn(args) or 0)
    except KeyboardInterrupt:
        print(f"\n{command_name(args)}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- a bug (None below) is re-raised with its traceback
        message = error_message(e)
        if message is None:
            raise
        print(f"{command_name(args)}: error: {message}", file=sys.stderr)
        return 1


def guard(fn: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    """Decorator form of :func:`run_guarded` (``main`` applies it too; a subcommand may use it on its own).

    ``OSError`` is included because transformers raises it for a model path or hub id that does not
    exist (and for unreadable files), the most common mistake on a command line.
    """

    def run(args: argparse.Namespace) -> int:
        return run_guarded(fn, args)

    run.__wrapped__ = fn  # type: ignore[attr-defined]
    return run


# ---- help texts ------------------------------------------------------------------------------------
RAW = argparse.RawDescriptionHelpFormatter


def describe(*paragraphs: str, width: int = 88) -> str:
    """A subcommand's description for ``formatter_class=RAW``: prose paragraphs wrapped to ``width``
    columns; lines that start with spaces (example commands) are kept as they are."""
    import textwrap

    out = []
    for para in paragraphs:
        lines = para.strip("\n").splitlines()
        if lines and all(line.startswith(" ") for line in lines if line.strip()):
            out.append("\n".join(lines))
        else:
            out.append(textwrap.fill(" ".join(line.strip() for line in lines), width))
    return "\n\n".join(out)


# ---- arguments every command spells the same way -------------------------------------------------
MODEL_HELP = "a local model directory, a Hugging Face Hub id, or 'demo' (the shipped quirky model)"


def add_model_arguments(p: argparse.ArgumentParser, batch_size: int | None = None) -> None:
    """``MODEL``, ``--dtype``, ``--device`` (and ``--batch-size`` when a default is given)."""
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to load the model in (default float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, or auto (default cpu)")
    if batch_size is not None:
        p.add_argument("--batch-size", type=int, default=batch_size,
                       help=f"rows per forward pass (default {batch_size})")


def add_progress_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (including the model-loading one)")


def add_command_group(subparsers: Any, name: str, **parser_kw: Any) -> Any:
    """Add ``intervene NAME`` with subcommands and return the object to add them to (``.add_parser``).

    ``parser_kw`` go to ``add_parser`` (``help``, ``description``, ``formatter_class``). The chosen subcommand
    lands in ``args.{name}_command`` (what :func:`command_name` reads); ``intervene NAME`` alone prints the
    group's help and exits with status 2.
    """
    top = subparsers.add_parser(name, **parser_kw)
    sub = top.add_subparsers(dest=f"{name}_command", metavar=f"{name.upper()}_COMMAND", title="commands")
    top.set_defaults(func=lambda args: (top.print_help(), 2)[1])
    return sub


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """``--checkpoint-dir`` and ``--resume`` of a training command (intervene.training's checkpoints)."""
    p.add_argument("--checkpoint-dir", default=None, help="write resumable checkpoints here (safetensors + JSON)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")


def progress_of(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False)


def load_model_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from the ``model``/``dtype``/``device`` arguments (``demo`` allowed)."""
    from intervene.assets import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device, progress=progress_of(args))


def status(args: argparse.Namespace, text: str) -> None:
    """A progress line on stderr (stdout stays for results); silent under ``--no-progress``."""
    if progress_of(args):
        print(text, file=sys.stderr, flush=True)


class Steps:
    """Numbered progress lines on stderr (``[2/4] truthfulness with ITI``) for commands whose steps
    have no progress bar of their own; silent under ``--no-progress``."""

    def __init__(self, args: argparse.Namespace, total: int) -> None:
        import time

        self.args, self.total, self.done = args, total, 0
        self.start = time.perf_counter()

    def __call__(self, what: str) -> None:
        self.done += 1
        status(self.args, f"[{self.done}/{self.total}] {what} (at {self.elapsed():.0f} s)")

    def elapsed(self) -> float:
        import time

        return time.perf_counter() - self.start


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` (parent folders created); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=2) + "\n")
    return out


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
        if isinstance(default, (tuple, list)):  # a sequence field: several values after one option
            item = type(default[0]) if default else str
            parser.add_argument(_option(f.name), dest=f.name, type=item, nargs="+", default=list(default),
                                choices=choices, help=f"{f.metadata.get('help', '')} (default {' '.join(map(str, default))})")
            continue
        args = typing.get_args(kind)
        base = kind if kind in (int, float, str) else next((a for a in args if a in (int, float, str)), str)
        parser.add_argument(_option(f.name), dest=f.name, type=base, default=default, choices=choices, help=help_text)


def config_from_args(config_cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The hyperparameter dataclass filled from parsed ``args`` (fields the parser lacks keep their defaults)."""
    from intervene.hparams import hparam_fields

    values = {f.name: (tuple(v) if isinstance(v, list) else v)
              for f in hparam_fields(config_cls) if hasattr(args, f.name) for v in [getattr(args, f.name)]}
    values.update(overrides)
    return config_cls(**values)
