"""Data-parallel collection under torchrun (gloo, 2 CPU processes): the result equals the single-process run bit
for bit and row for row, in memory and through the cache, and a run resumed after a killed rank loses nothing.

Every process runs on one thread in both settings (CPU kernels may sum in another order on other thread
counts). Each launch has a hard timeout, so CI never hangs on a stuck rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
JOB = ["-m", "tests.distributed.collect_job"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


def _run(args: list[str], ranks: int = 1, expect_ok: bool = True) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
              str(29500 + os.getpid() % 1000)] if ranks > 1 else [sys.executable]
    proc = subprocess.run([*launch, *JOB, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _same(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert sorted(x) == sorted(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process reference (every token of every row: the ragged layout)."""
    out = tmp_path_factory.mktemp("alone") / "one.st"
    _run([str(out), "--positions", "all"])
    return out


def test_two_ranks_equal_one_process_in_memory(tmp_path: Path, alone: Path) -> None:
    _run([str(tmp_path / "two.st"), "--positions", "all"], ranks=2)
    _same(alone, tmp_path / "two.st")


def test_a_cached_run_resumed_after_a_killed_rank_equals_one_process(tmp_path: Path, alone: Path) -> None:
    cache = str(tmp_path / "cache")
    killed = _run([str(tmp_path / "k.st"), "--positions", "all", "--cache", cache, "--die-after", "1"], ranks=2,
                  expect_ok=False)
    assert killed.returncode != 0 and not (tmp_path / "k.st").exists()
    _run([str(tmp_path / "resumed.st"), "--positions", "all", "--cache", cache], ranks=2)
    _same(alone, tmp_path / "resumed.st")
    # rank 0 had finished its block before rank 1 died: the resumed run did not recompute it
    assert (tmp_path / "resumed.st.forwards-0").read_text() == "0"
    assert int((tmp_path / "resumed.st.forwards-1").read_text()) == 3
    (entry,) = (tmp_path / "cache").iterdir()
    assert (entry / "index.json").is_file() and len(list(entry.glob("shard-*.safetensors"))) == 2
    # the merged cache reads back in one process without running the model
    _run([str(tmp_path / "again.st"), "--positions", "all", "--cache", cache])
    assert (tmp_path / "again.st.forwards-0").read_text() == "0"
    _same(alone, tmp_path / "again.st")


def _latent(args: list[str], ranks: int = 1, expect_ok: bool = True) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
              str(29600 + os.getpid() % 1000)] if ranks > 1 else [sys.executable]
    proc = subprocess.run([*launch, "-m", "tests.distributed.latent_job", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=240)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_latent_cache_on_two_ranks_equals_one_process_even_after_a_killed_rank(tmp_path: Path) -> None:
    """Every latent's entries, the stats and the tokens, bit for bit; the killed rank's block resumes."""
    _latent([str(tmp_path / "one"), str(tmp_path / "one.st")])
    killed = _latent([str(tmp_path / "two"), str(tmp_path / "k.st"), "--die-after", "1"], ranks=2, expect_ok=False)
    assert killed.returncode != 0 and not (tmp_path / "two" / "index.json").exists()
    _latent([str(tmp_path / "two"), str(tmp_path / "two.st")], ranks=2)
    _same(tmp_path / "one.st", tmp_path / "two.st")
    assert (tmp_path / "two.st.forwards-0").read_text() == "0"  # rank 0's block was finished before the kill


def test_intervene_elicit_under_torchrun_writes_what_one_process_writes(tmp_path: Path) -> None:
    args = ["-m", "intervene", "elicit", "demo", "quirky:addition", "--character", "Alice", "--max-examples", "48",
            "24", "--no-progress"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29700 + os.getpid() % 1000), *args, "--out", str(tmp_path / "two")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (tmp_path / "one" / "eval.csv").read_text(), (tmp_path / "two" / "eval.csv").read_text()
    assert a == b and a.count("\n") > 2
    for probe in (tmp_path / "one" / "probes").iterdir():
        _same(next(probe.glob("*.safetensors")), next((tmp_path / "two" / "probes" / probe.name).glob("*.safetensors")))
