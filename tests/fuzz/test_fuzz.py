"""CI's slice of the fuzz suite (``python -m tests.fuzz --cases N`` runs more; see tests/fuzz/harness.py)."""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path

from tests.fuzz import harness, mutate
from tests.fuzz.formats import LOADERS

CI_CASES = 2000  # ~30 s on an idle core; under ~100 s on two busy ones


def test_fuzz_slice(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # version 1 files warn by design
        results = harness.run(CI_CASES, master=0, work=tmp_path / "fuzz")
    text = harness.report(results)
    print(text)
    assert len(results) >= 1000
    assert {r.fmt for r in results} == set(LOADERS), "every format and loader is exercised"
    assert {r.expect.split(":")[0] for r in results} == {"reject", "same", "any"}
    assert all(r.ok for r in results), text


def test_cases_are_deterministic(tmp_path: Path) -> None:
    """The same master seed and index give the same mutation (so a failing case can be replayed)."""
    from tests.fuzz.seeds import build

    seeds = build(tmp_path / "seeds")
    got = []
    for attempt in range(2):
        descriptions = []
        for i in range(40):
            rng = random.Random(f"7:{i}")
            seed = harness._pick_seed(seeds, i, rng)
            root, outside = tmp_path / f"{attempt}-{i}" / "given", tmp_path / f"{attempt}-{i}" / "outside"
            shutil.copytree(seed.root, root, symlinks=True)
            outside.mkdir()
            kind = rng.choice(harness.MUTATIONS[seed.fmt])
            descriptions.append((seed.name, kind, *harness.KINDS[kind](mutate.Case(seed, root, outside, rng))))
        got.append([(s, k, d.split(" in ")[0], e) for s, k, d, e in descriptions])
    assert got[0] == got[1]
