"""The ``intervene`` command. Each subcommand lives in its own module with a ``register(subparsers)``.

MODEL arguments accept a local directory, a Hub id, or ``demo`` (the shipped quirky model).
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="intervene", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # A fixed set of our own modules (never names read from files or the environment).
    from intervene.cli import demo, elicit, features, iti, publish, remedi

    for mod in (demo, elicit, iti, remedi, publish, features):
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
