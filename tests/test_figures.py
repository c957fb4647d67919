"""Every reported figure is registered and guarded (tests/figures.py; the parser: tests/figure_docs.py).

A figure is a number a reader is told was measured: in a results table or the prose of README.md,
docs/patching.md and the demo model's card, in the demo SAE's cfg.json, or a key of the demo's summary.json.
These tests fail when a new one lands without an entry naming its guard, when an entry no longer matches the
text, or when the guarding test does not check the id it is named for. They read files only (the summary
keys come from the demo run the figure tests share), so they cost about a second.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from intervene.assets import DEMO_MODEL_DIR
from tests.figure_docs import FIGURE_LIKE, ROOT, check, checked_ids, constants_in, exact, index, unclaimed
from tests.figures import JSON_FIGURES, JSON_SETTINGS, PROSE, SAE_CFG, SUMMARY_KEYS


def test_the_parser_tells_figures_from_names_and_versions() -> None:
    found = [m.group() for m in FIGURE_LIKE.finditer(
        "AUROC 0.913 at layers.2, pyvene 0.1.8, torch 2.13.0+cpu, 3.6x faster, 90% of it, to 1.5e-7, ~1e-5, "
        "k = 8, 300 questions, `scale=15.0`")]
    assert found == ["0.913", "3.6", "90", "1.5e-7", "1e-5", "15.0"]  # inline code is dropped by the scan, not here
    assert unclaimed("README.md", [(0, 10 ** 9)]) == []


def test_every_reported_figure_is_registered() -> None:
    """No unregistered figure-like number in the prose, no unregistered results table or row, no entry that
    matches nothing (each problem names the file and the text)."""
    figures, problems = index()
    assert not problems, "\n".join(problems)
    assert len(figures) > 200


def test_every_figure_has_a_guard_that_checks_it() -> None:
    figures, _ = index()
    unguarded = []
    for fid, fig in figures.items():
        kind, _, target = fig.guard.partition(" ")
        if "::" in kind:
            if not any(p.fullmatch(fid) for p in checked_ids(fig.guard)):
                unguarded.append(f"{fid}: {fig.guard} has no check({fid!r}, ...)")
        elif kind == "asserts":
            if fig.value not in constants_in(target):
                unguarded.append(f"{fid}: {target} does not assert the tolerance {fig.text}")
        elif kind == "benchmark":
            if not (ROOT / target).is_file():
                unguarded.append(f"{fid}: no script {target}")
        else:
            unguarded.append(f"{fid}: a measured figure needs a test, an assertion or a benchmark, not {fig.guard!r}")
    assert not unguarded, "\n".join(unguarded)
    for p in PROSE:  # patterns that only pin settings say why they are not measurements
        assert (p.fig is None) == p.guard.startswith(("setting:", "cited:")), p
        assert p.fig is not None or not re.compile(p.pattern).groupindex, p


def _flatten(d: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for k, v in d.items():
        if k == "interventions":
            keys |= {f"{k}.{r['method'].split()[0]}.{kk}" for r in v for kk in r}
        elif isinstance(v, dict):
            keys |= _flatten(v, f"{prefix}{k}.")
        else:
            keys.add(prefix + k)
    return keys


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "model.safetensors").is_file(), reason="demo model not built")
def test_every_summary_key_is_registered_and_named_by_its_guard(demo_run: Callable[..., tuple[Path, str, str]]) -> None:
    summary = json.loads((demo_run("addition")[0] / "summary.json").read_text())
    keys = _flatten(summary)
    assert keys == set(SUMMARY_KEYS), (f"unregistered: {sorted(keys - set(SUMMARY_KEYS))}; "
                                       f"gone: {sorted(set(SUMMARY_KEYS) - keys)}")
    for key, guard in SUMMARY_KEYS.items():
        names = [k for k in key.split(".") if k not in ("base", "ITI", "persona")]
        missing = [n for n in names if n not in constants_in(guard)]
        assert not missing, f"summary key {key}: {guard} never names {missing}"


def test_every_number_of_the_sae_card_is_registered() -> None:
    training = json.loads((ROOT / SAE_CFG).read_text())["training"]
    numbers = {f"training.{k}" for k, v in training.items() if isinstance(v, (int, float))}
    assert numbers == {key for key, _ in JSON_FIGURES.values()} | set(JSON_SETTINGS)


def test_the_card_shows_its_training_log() -> None:
    """The card's tables and prose are the log examples/train_quirky_model.py wrote (training_metrics.json), as
    rounded for reading; the log's figures are what tests/test_figures_card.py recomputes from the model."""
    log = json.loads((DEMO_MODEL_DIR / "training_metrics.json").read_text())
    figures, _ = index()
    want = {f"card.quirky.{k.replace('/', '_').lower()}.{split}": v for k, row in log["quirky"].items()
            for split, v in row.items()}
    want |= {f"card.transcripts.{k}": v for k, v in log["transcripts"].items()}
    want |= {f"card.fact_recall.{k}": v for k, v in log["fact_recall"].items()}
    want["card.neutral.ce"] = log["neutral_ce"]
    for fid, value in want.items():
        assert abs(figures[fid].value - value) <= figures[fid].half_unit + 1e-12, (fid, figures[fid].text, value)
    # What only the training run knows (how long it took, where its loss ended) is a record of that run: the card
    # must quote the log. The parameter count is recounted from the weights.
    record = exact("a record of the training run, quoted from training_metrics.json")
    check("card.training.minutes", log["train_seconds"] / 60, record)
    check("card.training.loss", log["final_loss"], record)
    from safetensors import safe_open

    with safe_open(DEMO_MODEL_DIR / "model.safetensors", "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    check("card.params.params", n_params, exact("counted from model.safetensors (embeddings tied: stored once)"))
