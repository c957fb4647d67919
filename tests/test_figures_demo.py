"""The demo's figures, recomputed at the setting the README reports them with.

`intervene demo --task T` at its defaults (300 fitting questions, 150 held-out ones, seeds 0 / 1), one run per
task shared with tests/test_demo.py (the ``demo_run`` fixture). Checked against README.md's first table ("The
demo and the notebooks"), the ITI paragraph below it, and every figure key of ``summary.json`` (the keys are
listed in tests/figures.py, SUMMARY_KEYS). Each bound is the figure's sampling noise (tests/figure_docs.py):
two standard errors of an accuracy on the 150 held-out questions, of an AUROC on Bob's 150, of a mean CE
change over the 200 neutral texts.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from intervene.assets import DEMO_MODEL_DIR
from tests.figure_docs import Bound, auroc, binomial, check, exact, pgr

TASKS = ("addition", "comparison", "facts")
N_TEST = 150  # held-out questions per character (`intervene demo` default)
pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "model.safetensors").is_file(), reason="demo model not built")


@dataclass
class Run:
    summary: dict[str, Any]
    layers: list[dict[str, str]]  # auroc_by_layer.csv
    n_pos: int  # Bob's held-out statements that are true / false: the AUROC's two classes
    n_neg: int


@pytest.fixture(scope="module")
def runs(demo_run: Callable[..., tuple[Path, str, str]]) -> dict[str, Run]:
    from intervene.data.quirky import quirky_dataset

    out = {}
    for task in TASKS:
        folder = demo_run(task)[0]
        bob = [r for r in quirky_dataset(task, split="test", n=N_TEST, seed=1) if r["character"] == "Bob"]
        pos = sum(r["label"] for r in bob)
        with (folder / "auroc_by_layer.csv").open() as f:
            layers = list(csv.DictReader(f))
        out[task] = Run(json.loads((folder / "summary.json").read_text()), layers, pos, len(bob) - pos)
    return out


def _ce(row: dict[str, Any]) -> Bound:
    return Bound(2 * row["ce_delta_se"], "2 SE of a mean CE change over the 200 neutral texts")


def test_probe_transfer(runs: dict[str, Run]) -> None:
    """Truth probes fitted on Alice, scored on Bob against the truth: the best layer (AUROC, PGR) and layer 3
    (AUROC, floor, PGR). Summary keys best_auroc, best_layer, best_pgr."""
    for task, run in runs.items():
        s, n = run.summary, (run.n_pos, run.n_neg)
        rows = {int(r["layer"]): r for r in run.layers}
        best = rows[s["best_layer"]]
        check(f"readme.demo.probe.{task}.auroc", s["best_auroc"], auroc(s["best_auroc"], *n))
        check(f"readme.demo.probe.{task}.layer", s["best_layer"], exact("the first layer with the highest AUROC"))
        ceiling, floor = float(best["alice_auroc"]), float(best["floor_auroc"])
        check(f"readme.demo.probe.{task}.pgr", s["best_pgr"], pgr(s["best_auroc"], floor, ceiling, *n))
        last = rows[3]
        a, f, c = (float(last[k]) for k in ("auroc", "floor_auroc", "alice_auroc"))
        check(f"readme.demo.layer3.{task}.auroc", a, auroc(a, *n))
        check(f"readme.demo.layer3.{task}.floor", f, auroc(f, *n))
        check(f"readme.demo.layer3.{task}.pgr", float(last["pgr"]), pgr(a, f, c, *n))


def test_interventions(runs: dict[str, Run]) -> None:
    """ITI fitted on Alice only and the persona vector: Bob's and Alice's accuracy against the truth and the CE
    cost; summary keys bob_acc_truth_base, interventions (bob_acc_truth, alice_acc_truth, ce_delta), and the ITI
    paragraph's ranges (its CE costs, its best head on its validation questions)."""
    costs, heads = {}, {}
    for task, run in runs.items():
        s = run.summary
        base, iti, persona = s["interventions"]
        assert base["bob_acc_truth"] == s["bob_acc_truth_base"]
        check(f"readme.demo.iti_bob.{task}.before", s["bob_acc_truth_base"], binomial(s["bob_acc_truth_base"], N_TEST))
        check(f"readme.demo.iti_bob.{task}.after", iti["bob_acc_truth"], binomial(iti["bob_acc_truth"], N_TEST))
        check(f"readme.demo.iti_alice.{task}.alice", iti["alice_acc_truth"], binomial(iti["alice_acc_truth"], N_TEST))
        check(f"readme.demo.iti_alice.{task}.ce", iti["ce_delta"], _ce(iti))
        check(f"readme.demo.persona.{task}.bob", persona["bob_acc_truth"], binomial(persona["bob_acc_truth"], N_TEST))
        check(f"readme.demo.persona.{task}.ce", persona["ce_delta"], _ce(persona))
        costs[task], heads[task] = iti, s["iti_best_head"]
    lo, hi = min(costs.values(), key=lambda r: r["ce_delta"]), max(costs.values(), key=lambda r: r["ce_delta"])
    check("readme.iti.ce_range.lo", lo["ce_delta"], _ce(lo))
    check("readme.iti.ce_range.hi", hi["ce_delta"], _ce(hi))
    lo, hi = min(heads.values(), key=lambda h: h["accuracy"]), max(heads.values(), key=lambda h: h["accuracy"])
    check("readme.iti.best_head.lo", lo["accuracy"], binomial(lo["accuracy"], lo["n_val"]))
    check("readme.iti.best_head.hi", hi["accuracy"], binomial(hi["accuracy"], hi["n_val"]))


def test_what_the_demo_prints_beyond_the_readme(runs: dict[str, Run]) -> None:
    """summary.json's other figures: Alice's base accuracy, the absolute CE of the base model on the neutral
    texts, the KL of each edit and Alice under the persona vector (recorded values: tests/figures.py, MEASURED);
    and the bake check the README states (``~1e-5``)."""
    for task, run in runs.items():
        s = run.summary
        base, iti, persona = s["interventions"]
        check(f"summary.{task}.alice_acc_truth_base", s["alice_acc_truth_base"],
              binomial(s["alice_acc_truth_base"], N_TEST))
        assert base["alice_acc_truth"] == s["alice_acc_truth_base"] and base["ce_delta"] == base["kl"] == 0.0
        check(f"summary.{task}.ce_base", base["ce"], Bound(0.005, "the same 200 texts every task: float noise"))
        assert iti["ce"] == pytest.approx(base["ce"] + iti["ce_delta"]) and persona["ce"] == pytest.approx(
            base["ce"] + persona["ce_delta"])
        for name, row in (("iti", iti), ("persona", persona)):
            # KL(base || edited) tracks the CE change; its noise over texts is of the same size.
            check(f"summary.{task}.{name}.kl", row["kl"], _ce(row))
        check(f"summary.{task}.persona.alice_acc_truth", persona["alice_acc_truth"],
              binomial(persona["alice_acc_truth"], N_TEST))
        check("readme.demo.bake.diff", s["bake_max_abs_logit_diff"],
              exact("float32 rounding of the baked bias vs the hooked sum"), op="~")


def test_persona_at_full_gap_costs_about_six_times_more(runs: dict[str, Run],
                                                        demo_run: Callable[..., tuple[Path, str, str]]) -> None:
    """README: at --steer-scale 1.0 the persona vector's CE cost is about 6x that at 0.5 (addition)."""
    full = json.loads((demo_run("addition", "--steer-scale", "1.0")[0] / "summary.json").read_text())
    half = runs["addition"].summary["interventions"][2]
    at1 = full["interventions"][2]
    ratio = at1["ce_delta"] / half["ce_delta"]
    se = ratio * ((at1["ce_delta_se"] / at1["ce_delta"]) ** 2 + (half["ce_delta_se"] / half["ce_delta"]) ** 2) ** 0.5
    check("readme.demo.persona_full.ratio", ratio, Bound(2 * se, "2 SE of a ratio of two mean CE changes"))
