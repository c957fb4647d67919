"""The ``intervene`` command. Each subcommand lives in its own module with a ``register(subparsers)``.

MODEL arguments accept a local directory, a Hub id, or ``demo`` (the shipped quirky model).
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="intervene", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Our own modules and the registered methods' subcommands (never names read from files).
    from intervene.cli import demo, elicit, features, publish
    from intervene.registry import registered_methods

    demo.register(sub)
    elicit.register(sub)
    for cli in dict.fromkeys(s.cli for s in registered_methods().values() if s.cli is not None):
        cli(sub)  # a package registering several types adds its subcommand once
    publish.register(sub)
    features.register(sub)
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
