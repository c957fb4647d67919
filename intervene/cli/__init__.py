"""The ``intervene`` command. Each subcommand lives in its own module with a ``register(subparsers)``.

MODEL arguments accept a local directory, a Hub id, or ``demo`` (the shipped quirky model).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Fixed list (never names read from files or the environment): module -> what it adds.
_SUBCOMMAND_MODULES = (
    "intervene.cli.demo",  # demo
    "intervene.cli.elicit",  # elicit, eval, sweep, plot
    "intervene.cli.iti",  # iti fit / eval / sweep
    "intervene.cli.remedi",  # remedi fit / eval
    "intervene.cli.publish",  # bake, push
    "intervene.cli.features",  # features cache / explain / score
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="intervene", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in _SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name != mod_name:  # a real missing dependency inside the module
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
