"""Patching on the shipped demo model: where Bob's systematic error enters, the attribution estimate's agreement
with real patching, the edit that follows, and ``intervene patch``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch

import intervene as iv
from intervene.data.quirky import quirky_dataset, speaker_pairs
from intervene.evaluate.choices import choice_logits
from intervene.methods.patching import agreement, attribution_patching, logit_diff, sweep


@pytest.fixture(scope="module")
def demo():
    return iv.demo_model()


def _pairs(tok, task: str, n: int = 24) -> list[dict]:
    """Alice/Bob pairs of the most common (template, length), so positions='each' lines up."""
    pairs = speaker_pairs(quirky_dataset(task, split="test", n=400, seed=0))
    key = Counter((p["template"], len(tok(p["clean"])["input_ids"])) for p in pairs).most_common(1)[0][0]
    return [p for p in pairs if (p["template"], len(tok(p["clean"])["input_ids"])) == key][:n]


def _metric(tok, pairs):
    first = [[tok(p[k], add_special_tokens=False)["input_ids"][0] for p in pairs] for k in ("answer", "wrong")]
    return logit_diff(*first)


def test_bobs_error_enters_at_the_answer_through_layer_0_attention(demo) -> None:
    """Measured (24 addition pairs): patching Alice's layer-0 attention output at the answer position recovers
    0.9997 of the logit difference, every state at the name token <= 0.0005, block outputs at the answer
    position >= 0.9997 at every layer. AtP agrees: Spearman 0.986 over the 49 live cells, 1.0 mean top-3."""
    model, tok = demo
    pairs = _pairs(tok, "addition")
    kw = dict(sites=["layers.*", "layers.*.attn", "layers.*.mlp"], tokenizer=tok, progress=False)
    clean, corrupted, metric = [p["clean"] for p in pairs], [p["corrupted"] for p in pairs], _metric(tok, pairs)
    res = sweep(model, clean, corrupted, metric, **kw)
    last = len(res.positions) - 1
    name = [j for j, t in enumerate(res.tokens or []) if t.strip() == "Bob"]
    assert name, res.tokens
    assert float(res.scores[res.rows.index("layers.0.attn"), last]) > 0.99
    assert float(res.scores[:, name].abs().max()) < 0.01
    assert float(res.scores[:4, last].min()) > 0.99  # layers.0..3 at the answer position
    est = attribution_patching(model, clean, corrupted, metric, **kw)
    agree = agreement(est, res)
    assert agree["spearman_live"] > 0.95 and agree["mean_top_overlap"] >= 0.9


def test_one_head_carries_the_speaker_and_patching_its_alice_mean_makes_bob_truthful(demo) -> None:
    """Head 2 of layer 0 at the answer position carries 0.84 of the effect (measured over 314 addition pairs,
    every template). A saved, constant patch — Alice's mean of that head at the last token — takes Bob from
    0.21 to 1.00 against the truth on addition (0.46 -> 1.00 comparison, 0.55 -> 1.00 facts), Alice 1.00."""
    model, tok = demo
    pairs = speaker_pairs(quirky_dataset("addition", split="test", n=400, seed=0))
    heads = sweep(model, [p["clean"] for p in pairs], [p["corrupted"] for p in pairs], _metric(tok, pairs),
                  sites=["layers.0.heads"], positions=[-1], tokenizer=tok, progress=False)
    assert int(heads.scores[:, 0].argmax()) == 2 and float(heads.scores[2, 0]) > 0.7
    alice = [r for r in quirky_dataset("addition", split="train", n=200, seed=0) if r["character"] == "Alice"]
    acts = iv.collect(model, tok, alice, sites="layers.0.heads", positions="last", progress=False)
    patch = iv.Patch.mean(acts, positions="last", heads=[2])
    test = quirky_dataset("addition", split="test", n=300, seed=1)
    bob = [r for r in test if r["character"] == "Bob"]
    truth = torch.tensor([r["alice_label"] for r in bob])
    before = float((choice_logits(model, tok, bob).argmax(-1) == truth).double().mean())
    with iv.Intervenable(model, [patch]):
        after = float((choice_logits(model, tok, bob).argmax(-1) == truth).double().mean())
    assert before < 0.35 and after > 0.97


def test_cli_patch_writes_grids_and_agreement(demo, tmp_path) -> None:
    _, tok = demo
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in _pairs(tok, "addition", 6)) + "\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "intervene", "patch", "demo", str(path), "--sites", "layers.*",
                           "--positions=-2,-1", "--method", "both", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "6 pairs" in proc.stdout and "agreement: Spearman" in proc.stdout
    for name in ("sweep.csv", "sweep.png", "attribution.csv", "attribution.png", "agreement.json"):
        assert (out / name).is_file(), name
    assert len((out / "sweep.csv").read_text().splitlines()) == 1 + 4 * 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "x"}\n')
    proc = subprocess.run([sys.executable, "-m", "intervene", "patch", "demo", str(bad), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "needs string fields" in proc.stderr and "Traceback" not in proc.stderr
