"""Causal tracing against a hand-written ROME-style reference, its invariants, the demo model's finding, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import intervene as iv
from intervene.methods.patching import noise_level, trace, trace_dataset
from intervene.methods.patching.cli import trace_items
from intervene.methods.patching.tracing import BUCKETS, buckets, subject_tokens
from tests.figure_docs import Bound, check, mean_of

PROMPT, SUBJECT, ANSWER = "Pel'elm works as a", "Pel'elm", " tailor"


@pytest.fixture(scope="module")
def demo():
    return iv.demo_model()


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _modules(model, kind: str, layer: int):
    block = model.model.layers[layer]
    return {"hidden": block, "mlp": block.mlp, "attn": block.self_attn}[kind]


@torch.no_grad()
def _reference(model, tok, restore: list[tuple[str, int, int]], nu: float, samples: int, seed: int) -> float:
    """ROME by hand: noise the subject's token embeddings with the documented per-(sample, position) draws,
    copy clean states back at (kind, layer, token), average P(answer) over the samples."""
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    subj = subject_tokens(tok, PROMPT, SUBJECT)
    answer = tok(ANSWER, add_special_tokens=False)["input_ids"][0]
    clean, hooks = {}, []
    for kind, layer, _ in restore:
        mod = _modules(model, kind, layer)
        hooks.append(mod.register_forward_hook(lambda m, a, o, k=(kind, layer): clean.__setitem__(k, _first(o).clone())))
    model(input_ids=ids)
    for h in hooks:
        h.remove()
    rows = ids.expand(samples, -1)

    def noisy(m, a, o):
        o = o.clone()
        for p in subj:
            g = torch.Generator().manual_seed(seed * 1_000_003 + p)
            o[:, p] += nu * torch.randn(samples, o.shape[-1], generator=g)
        return o

    hooks = [model.get_input_embeddings().register_forward_hook(noisy)]
    for kind, layer, t in restore:
        def put(m, a, o, k=(kind, layer), t=t):
            h = _first(o).clone()
            h[:, t] = clean[k][0, t]
            return (h, *o[1:]) if isinstance(o, tuple) else h
        hooks.append(_modules(model, kind, layer).register_forward_hook(put))
    try:
        probs = torch.softmax(model(input_ids=rows).logits[:, -1].float(), -1)[:, answer]
    finally:
        for h in hooks:
            h.remove()
    return float(probs.mean())


def test_trace_equals_rome_by_hand(demo) -> None:
    model, tok = demo
    nu = noise_level(model, tok, [PROMPT], [SUBJECT])
    res = trace(model, tok, PROMPT, SUBJECT, ANSWER, samples=4, window=3, seed=5)
    assert res.answer == ANSWER and res.subject_range == (1, 4)
    assert res.corrupted == pytest.approx(_reference(model, tok, [], nu, 4, 5), abs=1e-6)
    for kind, layer, t in (("hidden", 0, 3), ("hidden", 2, 6), ("mlp", 1, 3), ("attn", 1, 6)):
        window = [layer] if kind == "hidden" else list(range(max(0, layer - 1), min(4, layer + 2)))
        want = _reference(model, tok, [(kind, w, t) for w in window], nu, 4, 5)
        assert float(res.scores[kind][t, layer]) == pytest.approx(want, abs=1e-6), (kind, layer, t)


def test_trace_invariants(demo) -> None:
    model, tok = demo
    res = trace(model, tok, PROMPT, SUBJECT, ANSWER, window=1)
    # nothing before the subject sees the noise (causal attention): restoring it changes nothing
    for kind in ("hidden", "mlp", "attn"):
        assert res.indirect_effect(kind)[0].abs().max() < 1e-6
    # the last token's logits read only the last block's output there: restoring it gives the clean run back
    assert float(res.scores["hidden"][-1, -1]) == pytest.approx(res.clean, abs=1e-5)
    assert res.total_effect > 0.3


def test_buckets_follow_rome() -> None:
    # tokens: 0 1 [2 3 4] 5 6 7 -> subject 2..4
    assert buckets(8, (2, 5)) == [[2], [3], [4], [5], [6], [7]]
    assert buckets(5, (1, 2)) == [[1], [], [1], [2], [3], [4]]
    assert len(BUCKETS) == 6


def test_demo_model_recalls_facts_at_the_entitys_last_token_in_block_0(demo) -> None:
    """The trace agrees with the REMEDI work: block 0 (its MLP) at the entity's last token is where the
    fact enters; later states of the subject carry nothing. docs/patching.md's and the README's figures on 40
    facts, each within its 95% interval over the facts (the half-width the trace reports; for the intervals
    themselves, two standard errors of an SD estimated from 40 facts, 2/sqrt(2·39) of it)."""
    model, tok = demo
    res = trace_dataset(model, tok, trace_items("quirky:facts", 40), window=1, progress=False, keep=True)
    assert res.n == 40 and res.skipped == 0
    totals = [t.total_effect for t in res.traces]
    check("docs.trace.total", res.total_effect, mean_of(totals, "facts"))
    subject = [0, 1, 2]  # first / middle / last subject token buckets
    last_subject = 2
    for kind in ("hidden", "mlp", "attn"):
        aie, ci = float(res.aie[kind][last_subject, 0]), float(res.ci[kind][last_subject, 0])
        check(f"docs.trace.{kind}", aie, Bound(ci, "the 95% interval over the 40 facts"))
        if kind != "attn":
            check(f"docs.trace.{kind}_ci", ci, Bound(2 * ci / math.sqrt(2 * 39), "2 SE of a 95% half-width "
                                                     "estimated from 40 facts"))
            assert res.peak_within(kind, subject) == ("last subject token", 0)
    check("readme.trace.aie", float(res.aie["hidden"][last_subject, 0]),
          Bound(float(res.ci["hidden"][last_subject, 0]), "the 95% interval over the 40 facts"))
    # "every later subject state <= 0.008": the largest AIE of the subject's states after layer 0, any kind
    # (measured 0.0084: the first subject token's hidden state at layer 1), may exceed it by its own 95% half-width.
    later = {k: torch.nan_to_num(res.aie[k][subject, 1:]) for k in ("hidden", "mlp", "attn")}
    kind, cell = max(((k, divmod(int(v.argmax()), v.shape[1])) for k, v in later.items()),
                     key=lambda kc: float(later[kc[0]][kc[1]]))
    worst = float(later[kind][cell])
    check("docs.trace.later", worst, Bound(float(res.ci[kind][subject][cell[0], 1 + cell[1]]),
                                           "the 95% interval of the largest later cell"), op="<=")
    assert float(res.aie["attn"][2, 0]) < float(res.aie["mlp"][2, 0])  # the MLP, not attention, adds the fact


def test_cli_trace_writes_csv_and_plots(tmp_path) -> None:
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "subject": s, "answer": a}) for p, s, a in [
        (PROMPT, SUBJECT, ANSWER), ("Jor'uth likes the colour", "Jor'uth", " white")]) + "\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "intervene", "trace", "demo", str(data), "--window", "1",
                           "--samples", "3", "--kinds", "hidden", "mlp", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "traced 2 facts" in proc.stdout and "Largest average indirect effects" in proc.stdout
    lines = (out / "trace.csv").read_text().splitlines()
    assert lines[0] == "kind,bucket,layer,aie,ci95" and len(lines) == 1 + 2 * 6 * 4
    assert (out / "trace.png").stat().st_size > 1000 and (out / "fact_0.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "intervene", "trace", "demo", "quirky:addition", "--out",
                          str(out)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "needs facts" in bad.stderr and "Traceback" not in bad.stderr
