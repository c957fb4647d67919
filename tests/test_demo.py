"""`intervene demo` end to end on the shipped model (reduced size), and the example scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from intervene.assets import DEMO_MODEL_DIR
from intervene.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "model.safetensors").is_file(), reason="demo model not built")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """One `intervene demo --quick --no-progress` for the tests below: (output folder, stdout, stderr)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "demo"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    return out, stdout.getvalue(), stderr.getvalue()


def test_demo_quick_writes_sane_outputs(demo_run: tuple[Path, str, str]) -> None:
    out, printed_out, printed_err = demo_run
    summary = json.loads((out / "summary.json").read_text())
    for name in ("auroc_by_layer.png", "auroc_by_layer.csv", "interventions.csv", "iti-diff/intervene_config.json",
                 "iti-diff/intervene_weights.safetensors", "iti-baked/model.safetensors", "iti-baked/config.json",
                 "report.html", "iti_heads.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "auroc_by_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["bake_max_abs_logit_diff"] < 1e-4
    assert summary["alice_acc_truth_base"] > 0.9  # the quirk is there: Alice truthful...
    assert summary["examples"] and all(e["bob"] != e["truth"] for e in summary["examples"])  # ...Bob is not
    assert 0.0 <= summary["best_auroc"] <= 1.0
    methods = [r["method"] for r in summary["interventions"]]
    assert methods[0] == "base model" and any(m.startswith("ITI") for m in methods)
    for r in summary["interventions"]:
        assert 0.0 <= r["bob_acc_truth"] <= 1.0 and r["kl"] >= 0.0
    # What a newcomer reads: floor and PGR explained, no progress bar under --no-progress.
    assert "floor: a probe fitted on Bob's own (wrong)" in printed_out and "PGR = (AUROC - floor)" in printed_out
    assert "Loading weights" not in printed_err and "Writing model shards" not in printed_err
    # The diff's card names no path of this machine and links nowhere it should not.
    card = (out / "iti-diff" / "README.md").read_text()
    assert str(DEMO_MODEL_DIR) not in card and "base_model:" not in card and "github.com/)" not in card
    assert "intervene.demo_model()" in card


def test_demo_report_renders_in_a_real_browser(demo_run: tuple[Path, str, str], tmp_path: Path) -> None:
    from tests.browser import browser, visit

    out = demo_run[0]
    with browser() as b:
        v = visit(b, out / "report.html", tmp_path / "report.png")
    assert not v.errors and not v.requests and v.title.startswith("intervene demo")
    assert (tmp_path / "report.png").stat().st_size > 20_000


def test_steer_with_probe_shows_its_effect_at_its_defaults() -> None:
    """At its default probe and layer the example moves Bob's accuracy a lot (not +0 as it once did)."""
    r = subprocess.run([sys.executable, str(ROOT / "examples/steer_with_probe.py"), "--fractions", "0", "0.25", "0.4"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    gain = float(r.stdout.split("moves Bob's accuracy by ")[1].split()[0])
    assert gain >= 0.5 and "<- chosen" in r.stdout


def test_load_diff_example_changes_the_answer_and_cleans_up(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "examples/load_diff_and_generate.py")], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env={**ENV, "TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "base:    ' True'" in r.stdout and "steered: ' False'" in r.stdout
    assert not list(tmp_path.glob("diff-*"))  # its temporary diff folder is gone (torch may leave its own)


def test_bake_example_dry_run(tmp_path: Path) -> None:
    import torch

    import intervene as iv

    model, _ = iv.demo_model()
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    iv.Intervenable(model, iv.Steering({"layers.1": v}, scale=2.0), attach=False).save_pretrained(tmp_path / "d")
    r = subprocess.run([sys.executable, str(ROOT / "examples/bake_and_push.py"), str(tmp_path / "d"),
                        "--dry-run", str(tmp_path / "baked")], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    diff = float(r.stdout.strip().rsplit("=", 1)[1])
    assert diff < 1e-4
