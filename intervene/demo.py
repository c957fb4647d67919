"""The end-to-end demo behind ``intervene demo``: elicit, steer, publish, bake — offline, on CPU.

On the shipped quirky model (truthful for Alice, systematically wrong for Bob) it
1. shows Bob's wrong answers next to Alice's right ones;
2. collects block outputs, fits a truth probe per layer on Alice's prompts and reports, per layer,
   AUROC on Bob's prompts against the truth, between a ceiling (the probe on Alice's own prompts) and a
   floor (a probe fitted on Bob's own, wrong, labels), and the PGR, the share of the floor-to-ceiling
   gap the transfer recovers (printed as n/a where the gap is too small to divide by);
3. fits ITI on Alice's prompts alone, each followed by a true and a false answer (TruthfulQA's
   format), and a persona steering vector (the mean difference of Alice's and Bob's block outputs, at
   the best truth layer), and reports Bob's accuracy against the truth and CE/KL on neutral text with
   the edit at every position (as the ITI paper measures it);
4. saves the ITI diff, reloads it with ``Intervenable.load``, bakes it, reloads the baked model with
   vanilla ``transformers`` and checks that the logits match.
Everything lands in one output folder, with ``report.html`` to read it in a browser.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from intervene.intervenable import Intervenable

# The PGR is reported as n/a where it would divide noise by noise: the ceiling-minus-floor gap (AUROC) is
# under MIN_PGR_GAP, or even the ceiling (Alice's probe on Alice) is under MIN_CEILING (nothing to transfer).
MIN_PGR_GAP = 0.1
MIN_CEILING = 0.6
EXPLAIN_PGR = """\
  AUROC: the probe fitted on Alice, scored on Bob's statements against the truth (0.5 = chance, 1 = perfect).
  ceiling: the same probe on Alice's own held-out statements. floor: a probe fitted on Bob's own (wrong)
  labels, scored against the truth: what you get by learning what Bob says. PGR = (AUROC - floor) /
  (ceiling - floor): the share of the floor-to-ceiling gap recovered (1 = all; n/a where the ceiling is
  under 0.6 or the gap under 0.1: nothing to recover). A layer with PGR 0 reads what the speaker will
  say, not the truth."""
EXPLAIN_COST = """\
  Bob acc: Bob's answers scored against the truth (base: his quirk). CE: cross-entropy on neutral text,
  nats per token, with the edit at every position; +0.3 is a mild cost, +3 means the text is garbled.
  Persona steering adds scale x (mean Alice - mean Bob) at the first layer where the truth probe works:
  it turns Bob into Alice outright, and costs more than ITI because it moves every token; --steer-scale
  sets the scale (examples/steer_with_probe.py shows how to choose one with a sweep)."""


def _accuracy(model: Any, tok: Any, rows: list[dict], target: str = "label") -> float:
    from intervene.evaluate.choices import choice_logits

    pred = choice_logits(model, tok, rows).argmax(-1)
    return float((pred == torch.tensor([r[target] for r in rows])).float().mean())


def _by_character(rows: list[dict], who: str) -> list[dict]:
    return [r for r in rows if r["character"] == who]


def _say(verbose: bool, *lines: str) -> None:
    if verbose:
        print(*lines, sep="\n", flush=True)


def show_answers(model: Any, tok: Any, rows: list[dict], k: int = 4) -> list[dict]:
    """Rows where Bob's error matters: the question, the truth, Alice's and Bob's answers."""
    from intervene.evaluate.choices import choice_logits

    alice = {r["question_id"]: r for r in _by_character(rows, "Alice")}
    pairs = [(alice[r["question_id"]], r) for r in _by_character(rows, "Bob")
             if r["question_id"] in alice and r["bob_label"] != r["label"]][:k]
    if not pairs:
        return []
    preds = choice_logits(model, tok, [p for pair in pairs for p in pair]).argmax(-1).view(-1, 2)
    names = [c.strip() for c in pairs[0][0]["choices"]]
    return [{"statement": a["statement"], "truth": names[a["label"]], "alice": names[int(pa)],
             "bob": names[int(pb)]} for (a, _), (pa, pb) in zip(pairs, preds.tolist())]


def elicit_by_layer(model: Any, tok: Any, train: list[dict], test: list[dict], batch_size: int,
                    progress: bool) -> tuple[list[dict], Any, torch.Tensor]:
    """Per-layer truth probes (fitted on Alice) evaluated on Bob against the truth, with PGR."""
    from intervene.activations import collect
    from intervene.evaluate.transfer import pgr
    from intervene.probes import LogisticRegressionProbe, auroc, bootstrap_ci

    def acts(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        a = collect(model, tok, rows, sites="layers.*", positions="last", batch_size=batch_size, progress=progress)
        return torch.stack([a[s] for s in a.sites]), torch.tensor([r["label"] for r in rows])

    xa_tr, ya_tr = acts(_by_character(train, "Alice"))
    xb_tr, _ = acts(_by_character(train, "Bob"))
    yb_tr_bob = torch.tensor([r["bob_label"] for r in _by_character(train, "Bob")])
    xa_te, ya_te = acts(_by_character(test, "Alice"))
    xb_te, yb_te = acts(_by_character(test, "Bob"))
    alice_probe = LogisticRegressionProbe(C=0.1).fit(xa_tr, ya_tr)  # [L] probes in one batched fit
    bob_probe = LogisticRegressionProbe(C=0.1).fit(xb_tr, yb_tr_bob)
    transfer = auroc(yb_te, alice_probe.decision_function(xb_te))
    floor = auroc(yb_te, bob_probe.decision_function(xb_te))
    ceiling = auroc(ya_te, alice_probe.decision_function(xa_te))
    gap = pgr(transfer, floor, ceiling)
    undefined = ((ceiling - floor).abs() < MIN_PGR_GAP) | (ceiling < MIN_CEILING)
    gap = torch.where(undefined, torch.full_like(gap, float("nan")), gap)
    rows = []
    for layer in range(xa_tr.shape[0]):
        ci = bootstrap_ci(auroc, yb_te, alice_probe.decision_function(xb_te)[layer], n=1000, seed=0)
        rows.append({"layer": layer, "auroc": float(transfer[layer]), "auroc_lower": float(ci.lower),
                     "auroc_upper": float(ci.upper), "alice_auroc": float(ceiling[layer]),
                     "floor_auroc": float(floor[layer]),
                     "pgr": None if bool(gap[layer].isnan()) else float(gap[layer])})
    persona_x = torch.cat([xa_tr, xb_tr], dim=1)
    return rows, alice_probe, persona_x


def run_demo(out: str | Path = "intervene-demo-out", model_name: str = "demo", task: str = "addition",
             n_train: int = 300, n_test: int = 150, iti_heads: int = 8, iti_alpha: float = 1.5,
             steer_scale: float = 0.5, batch_size: int = 64, progress: bool = True,
             verbose: bool = True) -> dict[str, Any]:
    """Run the demo and write its outputs to ``out``; returns the summary (also ``summary.json``)."""
    from transformers import AutoModelForCausalLM

    from intervene.assets import load_model, quiet_loading
    from intervene.data.quirky import quirky_dataset
    from intervene.elicit import write_csv
    from intervene.evaluate.side_effects import load_reference_texts, side_effects
    from intervene.methods.iti.intervention import ITI
    from intervene.methods.iti.plots import plot_head_accuracies
    from intervene.methods.steering.intervention import Steering
    from intervene.plots import plot_metric_by_layer
    from intervene.probes import MeanDiffProbe

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tok = load_model(model_name, progress=progress)
    tok.padding_side = "left"
    train = quirky_dataset(task, split="train", n=n_train, seed=0)
    test = quirky_dataset(task, split="test", n=n_test, seed=1)
    bob_test, alice_test = _by_character(test, "Bob"), _by_character(test, "Alice")

    # 1. the quirk
    examples = show_answers(model, tok, test)
    _say(verbose, f"\n== 1. The quirk ({task}): Bob's answers next to Alice's ==")
    for e in examples:
        _say(verbose, f"  {e['statement']:<40} truth={e['truth']:<5} Alice={e['alice']:<5} Bob={e['bob']}")
    base_bob = _accuracy(model, tok, bob_test)
    base_alice = _accuracy(model, tok, alice_test)

    # 2. eliciting latent knowledge
    _say(verbose, "\n== 2. Truth probes fitted on Alice, evaluated on Bob against the truth ==")
    layer_rows, alice_probe, persona_x = elicit_by_layer(model, tok, train, test, batch_size, progress)
    write_csv(out / "auroc_by_layer.csv", layer_rows)
    transfer = "Alice's probe on Bob, vs the truth (95% CI)"
    ceiling, floor = "ceiling: Alice's probe on Alice", "floor: probe fitted on Bob's labels"
    plot_metric_by_layer({ceiling: [{"layer": r["layer"], "auroc": r["alice_auroc"]} for r in layer_rows],
                          floor: [{"layer": r["layer"], "auroc": r["floor_auroc"]} for r in layer_rows],
                          transfer: layer_rows},  # drawn last: on top where it meets the ceiling
                         out / "auroc_by_layer.png", title=f"Truth probe transfer, quirky {task}",
                         styles={ceiling: {"linestyle": "--", "color": "tab:green", "markersize": 6},
                                 floor: {"linestyle": "--", "color": "tab:red"},
                                 transfer: {"color": "tab:blue", "linewidth": 2}})
    _say(verbose, EXPLAIN_PGR)
    for r in layer_rows:
        _say(verbose, f"  layer {r['layer']}: AUROC {r['auroc']:.3f} [{r['auroc_lower']:.3f}, {r['auroc_upper']:.3f}]"
                      f"  ceiling {r['alice_auroc']:.3f}  floor {r['floor_auroc']:.3f}  PGR {_pgr(r['pgr'])}")
    best = max(layer_rows, key=lambda r: r["auroc"])

    # 3. interventions: ITI and a persona-probe steering vector
    _say(verbose, "\n== 3. Interventions: Bob's accuracy against the truth, CE on neutral text ==")
    alice_train = _by_character(train, "Alice")
    iti = ITI.fit(model, tok, alice_train, num_heads=iti_heads, alpha=iti_alpha, batch_size=batch_size,
                  progress=progress)
    n_alice = len(alice_train)
    is_alice = torch.cat([torch.ones(n_alice), torch.zeros(persona_x.shape[1] - n_alice)]).long()
    persona = MeanDiffProbe().fit(persona_x, is_alice)
    # The earliest layer where the truth is linearly present (the name is separable from the first layer on):
    # steering the persona there changes who answers before the answer is formed.
    layer = min((int(r["layer"]) for r in layer_rows if r["auroc"] >= 0.95), default=int(best["layer"]))
    d = persona.direction_[layer]
    gap = float((persona_x[layer][is_alice == 1].mean(0) - persona_x[layer][is_alice == 0].mean(0)) @ d)
    steer = Steering.from_probe(persona, f"layers.{layer}", scale=steer_scale * gap, index=layer, name="persona")
    from intervene.assets import resolve_model_name

    ref = Path(resolve_model_name(model_name)) / "neutral_eval.txt"
    neutral = load_reference_texts(ref if ref.is_file() else None, n=200)
    table = [{"method": "base model", "bob_acc_truth": base_bob, "alice_acc_truth": base_alice,
              "ce": None, "ce_delta": 0.0, "kl": 0.0}]
    for label, edit in ((f"ITI (K={iti_heads}, alpha={iti_alpha})", iti),
                        (f"persona steering (layer {layer}, {steer_scale:g} x gap = {steer.scale:.1f})", steer)):
        with Intervenable(model, edit) as ivm:
            bob, alice = _accuracy(ivm.model, tok, bob_test), _accuracy(ivm.model, tok, alice_test)
        fx = side_effects(model, tok, neutral, edit, batch_size=batch_size)
        table[0]["ce"] = fx["ce_base"]
        table.append({"method": label, "bob_acc_truth": bob, "alice_acc_truth": alice, "ce": fx["ce"],
                      "ce_delta": fx["ce_delta"], "kl": fx["kl"]})
    write_csv(out / "interventions.csv", table)
    _say(verbose, EXPLAIN_COST)
    for r in table:
        _say(verbose, f"  {r['method']:<50} Bob acc {r['bob_acc_truth']:.3f}  Alice acc {r['alice_acc_truth']:.3f}"
                      f"  CE {r['ce']:.3f} ({r['ce_delta']:+.3f})  KL {r['kl']:.3f}")

    # 4. publish: diff -> load -> bake -> vanilla transformers
    _say(verbose, "\n== 4. Save the ITI diff, reload it, bake it, load the baked model with plain transformers ==")
    ivm = Intervenable(model, iti, attach=False)
    ivm.metadata = {"method": "ITI", "task": task, "fitted_on": "Alice prompts with true and false answers", "num_heads": iti_heads,
                    "alpha": iti_alpha, "bob_acc_truth_before": round(base_bob, 3),
                    "bob_acc_truth_after": round(table[1]["bob_acc_truth"], 3)}
    ivm.save_pretrained(out / "iti-diff")
    loaded = Intervenable.load(out / "iti-diff", model)
    batch = tok([r["text"] for r in bob_test[:16]], return_tensors="pt", padding=True)
    hooked = loaded(**batch).logits
    baked = loaded.bake()
    loaded.detach()
    with quiet_loading(progress):
        baked.save_pretrained(out / "iti-baked")
        tok.save_pretrained(out / "iti-baked")
        vanilla = AutoModelForCausalLM.from_pretrained(out / "iti-baked").eval()
    with torch.no_grad():
        plain = vanilla(**batch).logits
    real = batch["attention_mask"].bool()
    bake_err = float((plain - hooked.detach())[real].abs().max())
    _say(verbose, f"  diff: {sum(p.stat().st_size for p in (out / 'iti-diff').iterdir()) / 1024:.1f} KiB;"
                  f" baked vs hooked max |dlogit| = {bake_err:.2e}")

    summary = {"task": task, "model": model_name, "examples": examples, "bob_acc_truth_base": base_bob,
               "alice_acc_truth_base": base_alice, "best_layer": best["layer"], "best_auroc": best["auroc"],
               "best_pgr": best["pgr"], "interventions": table, "bake_max_abs_logit_diff": bake_err,
               "outputs": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())}
    plot_head_accuracies(iti.head_accuracies_, out / "iti_heads.png", iti.heads)
    write_report(out, summary, layer_rows, iti)
    summary["outputs"] = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _say(verbose, "\n== Summary ==", summary_table(summary),
         f"\nEverything is in {out.resolve()}; open {out / 'report.html'} in a browser.")
    return summary


def _pgr(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.2f}"  # None / NaN: no gap to recover


def summary_table(summary: dict[str, Any]) -> str:
    """The demo's headline numbers as a Markdown table."""
    lines = ["| what | value |", "|---|---|",
             f"| Bob accuracy vs truth (base) | {summary['bob_acc_truth_base']:.3f} |",
             f"| Alice accuracy vs truth (base) | {summary['alice_acc_truth_base']:.3f} |",
             f"| best probe layer: AUROC on Bob vs truth | {summary['best_auroc']:.3f} (layer {summary['best_layer']}) |",
             f"| PGR at that layer | {_pgr(summary['best_pgr'])} |"]
    for r in summary["interventions"][1:]:
        lines.append(f"| {r['method']}: Bob acc vs truth / CE cost | {r['bob_acc_truth']:.3f} / {r['ce_delta']:+.3f} |")
    lines.append(f"| baked vs hooked max abs logit diff | {summary['bake_max_abs_logit_diff']:.1e} |")
    return "\n".join(lines)


def write_report(out: Path, summary: dict[str, Any], layer_rows: list[dict], iti: Any) -> Path:
    """``out/report.html``: the demo's numbers, figures and explanations on one self-contained page."""
    from intervene.htmlpage import cards, esc, image, page, table, write_page
    from intervene.methods.iti.report import heads_section

    inter = summary["interventions"]
    body = [f"<h1>intervene demo: quirky {esc(summary['task'])}</h1>",
            cards([("Bob's accuracy vs the truth", f"{summary['bob_acc_truth_base']:.3f}"),
                   ("with ITI", f"{inter[1]['bob_acc_truth']:.3f}"),
                   ("best truth-probe AUROC on Bob", f"{summary['best_auroc']:.3f} (layer {summary['best_layer']})"),
                   ("baked vs hooked max |dlogit|", f"{summary['bake_max_abs_logit_diff']:.1e}")]),
            "<h2>1. The quirk</h2><p class=\"note\">The model answers truthfully when the prompt names Alice and "
            "systematically wrong when it names Bob.</p>",
            table(["statement", "truth", "Alice says", "Bob says"],
                  [[e["statement"], e["truth"], e["alice"], e["bob"]] for e in summary["examples"]], sortable=False),
            "<h2>2. Does the model know the truth while Bob lies?</h2>",
            f'<p class="note">{esc(EXPLAIN_PGR)}</p>', image(out / "auroc_by_layer.png", "AUROC by layer"),
            table(["layer", "AUROC on Bob vs truth", "95% CI", "ceiling", "floor", "PGR"],
                  [[r["layer"], r["auroc"], f"[{r['auroc_lower']:.3f}, {r['auroc_upper']:.3f}]", r["alice_auroc"],
                    r["floor_auroc"], _pgr(r["pgr"])] for r in layer_rows], numeric=[0, 1, 3, 4, 5]),
            "<h2>3. Making Bob truthful, and what it costs</h2>", f'<p class="note">{esc(EXPLAIN_COST)}</p>',
            table(["method", "Bob acc vs truth", "Alice acc vs truth", "CE", "CE cost", "KL"],
                  [[r["method"], r["bob_acc_truth"], r["alice_acc_truth"], r["ce"], f"{r['ce_delta']:+.3f}", r["kl"]]
                   for r in inter], numeric=[1, 2, 3, 4, 5]),
            "<h3>Where ITI acts</h3>", heads_section(iti, out / "iti_heads.png"),
            "<h2>4. Publish and bake</h2>",
            '<p class="note">The ITI edit was saved as a diff (iti-diff/), loaded back with Intervenable.load, baked '
            "into the weights (iti-baked/) and the baked model loaded with plain transformers: its logits match "
            f"the hooked model's to {summary['bake_max_abs_logit_diff']:.1e}.</p>"]
    return write_page(out / "report.html", page(f"intervene demo: quirky {summary['task']}", "\n".join(body)))
