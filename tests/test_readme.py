"""The README's code runs, as the notebooks do (so what a newcomer copies cannot rot).

* every ```python block runs, in order, in one fresh interpreter, in a scratch directory;
* every ```bash block preceded by ``<!-- test: run -->`` runs there too (``intervene`` is this checkout's CLI);
* every other ``intervene ...`` line in a ```bash block must parse (argparse accepts it), and every
  ``pip install -e ".[extras]"`` must name extras that pyproject.toml defines.

Offline and on the demo model only; the runnable blocks are sized to keep this under a minute.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from intervene.assets import DEMO_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"(?P<mark><!-- test: (?P<what>[a-z]+)[^>]*-->\s*\n)?```(?P<lang>[a-z]*)\n(?P<code>.*?)```", re.S)
BLOCKS = [(m["lang"], m["what"], m["code"]) for m in BLOCK.finditer(README)]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
       "TOKENIZERS_PARALLELISM": "false"}
needs_demo = pytest.mark.skipif(not (DEMO_MODEL_DIR / "model.safetensors").is_file(), reason="demo model not built")


def _commands(code: str) -> list[str]:
    """The shell commands of a block: comments dropped, backslash continuations joined."""
    text = re.sub(r"\\\n\s*", " ", code)
    return [line.split(" #")[0].strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_readme_has_code_to_test() -> None:
    langs = [lang for lang, _, _ in BLOCKS]
    assert langs.count("python") >= 2 and any(what == "run" for _, what, _ in BLOCKS)


@needs_demo
def test_python_blocks_run(tmp_path: Path) -> None:
    code = "\n\n".join(c for lang, what, c in BLOCKS if lang == "python" and what != "skip")
    (tmp_path / "readme.py").write_text(code)
    r = subprocess.run([sys.executable, "readme.py"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Bob says: True | steered: False" in " ".join(r.stdout.split())  # what the README says it prints
    assert (tmp_path / "my-diff" / "intervene_config.json").is_file()


@needs_demo
def test_runnable_shell_blocks_run(tmp_path: Path) -> None:
    """Blocks of `intervene` commands run through the CLI's main() in one interpreter (the same entry point as
    the console script, without paying the imports once per line); any other block runs in bash."""
    for code in [c for lang, what, c in BLOCKS if lang == "bash" and what == "run"]:
        commands = _commands(code)
        if all(c.startswith("intervene ") for c in commands):
            script = ("import shlex, sys\nfrom intervene.cli import main\n"
                      f"for line in {commands!r}:\n"
                      "    print('$', line, flush=True)\n"
                      "    code = main(shlex.split(line)[1:])\n"
                      "    if code:\n        sys.exit(f'exit code {code}: {line}')\n")
            argv = [sys.executable, "-c", script]
        else:
            argv = ["bash", "-c", f'intervene() {{ {shlex.quote(sys.executable)} -m intervene "$@"; }}\nset -e\n{code}']
        r = subprocess.run(argv, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, code + "\n" + r.stdout[-2000:] + r.stderr[-3000:]


def test_every_intervene_command_line_parses() -> None:
    from intervene.cli import build_parser

    seen = 0
    for lang, _, code in BLOCKS:
        if lang != "bash":
            continue
        for cmd in _commands(code):
            for part in cmd.split("&&"):
                argv = shlex.split(part.replace("[", "").replace("]", ""))  # `--quick` in `[--quick]` is optional
                if not argv or argv[0] != "intervene":
                    continue
                build_parser(argv[1]).parse_args(argv[1:])  # raises SystemExit(2) on a bad line
                seen += 1
    assert seen >= 10


def test_pip_lines_name_real_extras() -> None:
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^([a-z]+) = \[", section, re.M))  # tomllib is 3.11+, we support 3.10
    named = re.findall(r'pip install -e "\.\[([a-z,]+)\]"', README)
    assert named and all(set(n.split(",")) <= extras for n in named), (named, extras)
