"""What `intervene --help` says: every command and argument described in plain words, fast, one error style."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from intervene.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every parser below ``parser``, by its full command (``"iti fit"``)."""
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                prefix = parser.prog.removeprefix("intervene").strip()
                full = f"{prefix} {name}".strip()
                out[full] = sub
                out.update(_subparsers(sub))
    return out


FULL = build_parser(full=True)
PARSERS = _subparsers(FULL)


def test_the_static_table_lists_every_subcommand_with_its_own_help() -> None:
    """`intervene --help` lists COMMANDS without importing the modules; they must say what the modules say
    (a method registering a subcommand that is not in the table fails here: add one line to COMMANDS)."""
    top = {a.dest: a.help for a in next(a for a in FULL._actions if isinstance(a, argparse._SubParsersAction))
           ._choices_actions}
    assert list(top) == list(COMMANDS), "add the new subcommand to intervene.cli.COMMANDS"
    for name, (help_text, _) in COMMANDS.items():
        assert top[name] == help_text, name


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_command_and_argument_is_described(command: str) -> None:
    p = PARSERS[command]
    text = p.format_help()
    assert "``" not in text and ":class:" not in text and ":func:" not in text, f"reST markup in {command} --help"
    assert p.description, f"intervene {command} has no description"
    missing = [a.dest for a in p._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
               and not a.help]
    assert not missing, f"intervene {command}: arguments without help: {missing}"


def test_top_level_help_is_for_users() -> None:
    text = FULL.format_help()
    assert "register(subparsers)" not in text and "``" not in text
    assert "intervene demo" in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from intervene import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"intervene {__version__}"


def test_help_and_version_do_not_import_torch() -> None:
    """The speed of `intervene --help` is the speed of not importing torch (measured: 0.3 s vs 2-7 s)."""
    code = ("import sys\nfrom intervene.cli import main\n"
            "for argv in (['--help'], ['--version'], ['demo', '--help'], ['elicit', '--help'], ['bake', '--help'],"
            " ['features', 'report', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('torch', 'transformers')))\n")
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert time.perf_counter() - start < 30  # generous: shared CI cores; the point is the import check above


def test_running_one_command_imports_only_its_module() -> None:
    code = ("import sys\nfrom intervene.cli import main\n"
            "try:\n    main(['plot', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'intervene.methods' not in sys.modules and 'intervene.cli.features' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
