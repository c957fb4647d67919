"""The ``intervene`` command: one subcommand per job, each in its own module with ``register(subparsers)``.

Listing the subcommands imports nothing heavy: :data:`COMMANDS` names each one with its one-line help
and a function importing the module that defines it, and only the module of the subcommand being run
(or asked for ``--help``) is imported. Method packages register their subcommand with the registry
(``register_method(..., cli=...)``); a registered subcommand missing from :data:`COMMANDS` still runs
(the registry is consulted for a name the table does not know), and ``tests/test_cli_words.py`` fails
until it is listed, so that ``intervene --help`` shows it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from intervene.version import __version__

Registrar = Callable[[Any], None]

DESCRIPTION = ("Inference-time interventions on Hugging Face language models: find a direction with a probe, "
               "steer or edit with it, save it as a small diff, bake it into the weights, publish it.")
EPILOG = ("MODEL arguments take a local directory, a Hub id, or 'demo' (the shipped quirky model). "
          "Start with `intervene demo`; `intervene COMMAND --help` describes each command.")


# The modules that add subcommands. Fixed imports (never a name read from input), one function each,
# so importing one leaves the others (and torch, for the method packages) unloaded.
def _demo() -> Registrar:
    from intervene.cli import demo
    return demo.register


def _elicit() -> Registrar:
    from intervene.cli import elicit
    return elicit.register


def _iti() -> Registrar:
    from intervene.methods.iti import cli
    return cli.register


def _patching() -> Registrar:
    from intervene.methods.patching import cli
    return cli.register


def _remedi() -> Registrar:
    from intervene.methods.remedi import cli
    return cli.register


def _das() -> Registrar:
    from intervene.methods.das import cli
    return cli.register


def _reft() -> Registrar:
    from intervene.methods.reft import cli
    return cli.register


def _erase() -> Registrar:
    from intervene.methods.leace import cli
    return cli.register


def _publish() -> Registrar:
    from intervene.cli import publish
    return publish.register


def _features() -> Registrar:
    from intervene.cli import features
    return features.register


# name -> (one-line help, the module adding it). The order is the order of `intervene --help`; a module
# adding several subcommands adds them all at once, so its names are listed together.
COMMANDS: dict[str, tuple[str, Callable[[], Registrar]]] = {
    "demo": ("the end-to-end walkthrough on the shipped quirky model (offline, CPU)", _demo),
    "elicit": ("fit a probe per layer on a dataset and evaluate it (ELK-style)", _elicit),
    "eval": ("evaluate a run's probes on another dataset or persona (transfer)", _elicit),
    "sweep": ("elicit on every model x dataset (optionally pooled); summary CSV", _elicit),
    "plot": ("plot AUROC by layer, with confidence intervals, for an elicit run", _elicit),
    "iti": ("Inference-Time Intervention: fit, evaluate, sweep", _iti),
    "trace": ("causal tracing (ROME): where a model recalls facts", _patching),
    "patch": ("activation / attribution patching sweep over clean/corrupted pairs", _patching),
    "remedi": ("REMEDI learned representation editors: fit, evaluate", _remedi),
    "das": ("distributed alignment search: fit, evaluate (IIA)", _das),
    "reft": ("representation fine-tuning (LoReFT, DiReFT): fit, evaluate", _reft),
    "erase": ("LEACE concept erasure: fit an eraser, erase the quirky speaker", _erase),
    "bake": ("write a diff into a copy of the model's weights (exact, or refused)", _publish),
    "push": ("upload a diff directory to the Hugging Face Hub as one commit", _publish),
    "features": ("SAE latents: cache activations, explain, score, and browse them as HTML", _features),
}


def _top_parser() -> tuple[argparse.ArgumentParser, Any]:
    parser = argparse.ArgumentParser(prog="intervene", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("-V", "--version", action="version", version=f"intervene {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    return parser, sub


def _registry_registrars() -> list[Registrar]:
    """Subcommands of registered methods (imports every built-in method: used only for unlisted names)."""
    from intervene.registry import registered_methods

    return list(dict.fromkeys(s.cli for s in registered_methods().values() if s.cli is not None))


def build_parser(command: str | None = None, full: bool = False) -> argparse.ArgumentParser:
    """The ``intervene`` parser with ``command``'s module loaded and every other subcommand as a stub.

    ``full=True`` loads every module and every registered method's subcommand (tests use it to check
    the help texts of all arguments).
    """
    parser, sub = _top_parser()
    want = COMMANDS.get(command or "", (None, None))[1]
    loaded: set[Registrar] = set()
    for name, (help_text, load) in COMMANDS.items():
        if name in sub.choices:
            continue  # added with an earlier name of the same module
        if full or load is want:
            registrar = load()
            registrar(sub)
            loaded.add(registrar)
        else:
            sub.add_parser(name, help=help_text, add_help=False)  # listed, never parsed
    if full or (command and command not in COMMANDS):
        for registrar in _registry_registrars():
            if registrar not in loaded:
                registrar(sub)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the top level takes no option with a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """Run ``intervene ARGV``; returns the exit code (0 ok, 1 a reported error, 2 a usage error)."""
    from intervene.command import run_guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
