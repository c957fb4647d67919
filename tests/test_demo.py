"""`intervene demo` end to end on the shipped model (reduced size), and the example scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from intervene.assets import DEMO_MODEL_DIR
from intervene.cli import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "model.safetensors").is_file(), reason="demo model not built")


def test_demo_quick_writes_sane_outputs(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for name in ("auroc_by_layer.png", "auroc_by_layer.csv", "interventions.csv", "iti-diff/intervene_config.json",
                 "iti-diff/intervene_weights.safetensors", "iti-baked/model.safetensors", "iti-baked/config.json"):
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


@pytest.mark.parametrize("script,args", [
    ("examples/load_diff_and_generate.py", []),
    ("examples/steer_with_probe.py", ["--scale", "4"]),
])
def test_example_scripts_run(script: str, args: list[str]) -> None:
    r = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip()


def test_bake_example_dry_run(tmp_path: Path) -> None:
    import torch

    import intervene as iv

    model, _ = iv.demo_model()
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    iv.Intervenable(model, iv.Steering({"layers.1": v}, scale=2.0), attach=False).save_pretrained(tmp_path / "d")
    r = subprocess.run([sys.executable, str(ROOT / "examples/bake_and_push.py"), str(tmp_path / "d"),
                        "--dry-run", str(tmp_path / "baked")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    diff = float(r.stdout.strip().rsplit("=", 1)[1])
    assert diff < 1e-4
