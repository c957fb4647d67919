"""The README's code runs, as the notebooks do (so what a newcomer copies cannot rot).

* every ```python block runs, in order, in one fresh interpreter, in a scratch directory;
* every ```bash block preceded by ``<!-- test: run -->`` runs there too (``intervene`` is this checkout's CLI);
* every other ``intervene ...`` line in a ```bash block must parse (argparse accepts it), and every
  ``pip install -e ".[extras]"`` must name extras that pyproject.toml defines.

Offline and on the demo model only; the runnable blocks are sized to keep this under a minute.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from intervene.assets import DEMO_MODEL_DIR
from tests.figure_docs import Bound, binomial, check, exact

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


# After a block, what the figure checks below read (the block's own variables, printed as JSON on one line).
FIGURE_PROBES = {
    "activation_norm(": 'json.dumps({"norm": float(norm), "n_bob": len(bob), "rows": rows})',
    "print(grid.top(2))": 'json.dumps({"top": grid.top(1)[0], "se": float(grid.per_pair[grid.rows.index(grid.top(1)[0][0]), '
                          'grid.positions.index(grid.top(1)[0][1])].std() / len(pairs) ** 0.5 / abs(grid.clean - grid.corrupted)), '
                          '"n": len(pairs)})',
    "from intervene.methods.das import iia":
        'json.dumps({"n_test": len(speaker_swap_pairs(quirky_dataset("addition", split="test", n=40)))})',
}


@needs_demo
def test_python_blocks_run(tmp_path: Path) -> None:
    """The python blocks run in order, and the figures they print are what the README says they print (bounds:
    two binomial standard errors on the snippet's questions, two SE of a CE change over its texts)."""
    blocks = [c for lang, what, c in BLOCKS if lang == "python" and what != "skip"]
    parts = ["import json as __json"]
    for code in blocks:
        parts.append(code)
        for key, expr in FIGURE_PROBES.items():
            if key in code:
                parts.append(f"print('@@figures', {expr.replace('json.dumps', '__json.dumps')}, flush=True)")
    (tmp_path / "readme.py").write_text("\n\n".join(parts))
    r = subprocess.run([sys.executable, "readme.py"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Bob says: True | steered: False" in " ".join(r.stdout.split())  # what the README says it prints
    assert (tmp_path / "my-diff" / "intervene_config.json").is_file()
    lines = r.stdout.splitlines()
    probes = [json.loads(x.split(" ", 1)[1]) for x in lines if x.startswith("@@figures ")]
    assert len(probes) == len(FIGURE_PROBES), r.stdout[-2000:]
    scale, sweep_top, das = probes
    # "# 34.0 on the demo model": a mean over the 50 texts' tokens, deterministic: the rounding only.
    check("readme.scale.norm", scale["norm"], exact("deterministic on the README's 50 neutral texts"))
    n = scale["n_bob"]
    by_fraction = {round(row["scale"] / scale["norm"], 2): row for row in scale["rows"]}
    for fraction, name in ((0.0, "0"), (0.25, "25"), (0.4, "40"), (0.75, "75")):
        row = by_fraction[fraction]
        check(f"readme.scale.bob{name}", row["effect"], binomial(row["effect"], n))
        if fraction:
            check(f"readme.scale.ce{name}", row["ce_delta"],
                  Bound(2 * row["ce_delta_se"], "2 SE of a mean CE change over the 50 neutral texts"))
    assert "chosen:" in r.stdout and f"'scale': {by_fraction[0.4]['scale']}" in r.stdout  # choose_scale picks 0.4 x
    (site, _, score) = sweep_top["top"]
    assert site == "layers.0.attn"
    check("readme.sweep_snippet.recovery", score,
          Bound(2 * sweep_top["se"], f"2 SE of a mean over {sweep_top['n']} pairs, normalised"))
    # The DAS snippet prints one number, its held-out IIA on the speaker-swap pairs of 40 questions (bound: two
    # binomial SE on those pairs, 3/n at 1).
    iia = float(lines[lines.index(next(x for x in lines if x.startswith("@@figures") and "n_test" in x)) - 1])
    check("readme.das_snippet.iia", iia, binomial(iia, das["n_test"]))


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
