"""LoReFT and DiReFT against ITI and a steering vector on the demo model: Bob's accuracy against the truth,
Alice's, and the cross-entropy cost on neutral text, on the same held-out questions.

    python examples/reft_quirky.py                                  # addition, comparison, facts
    python examples/reft_quirky.py --tasks addition --out reft.json

Everything but the ReFTs is built exactly as ``intervene demo`` builds it (300 training questions, seed 0; 150
held-out questions, seed 1): ITI fitted on Alice's prompts alone (K=8, α=1.5) and the persona steering vector
(mean difference of Alice's and Bob's last-token states at the best probe layer, scaled to their gap). The
ReFTs are *supervised*: trained on the same 300 training questions asked of both characters with the truth
as target (rank 4, ``layers.0``, lr 4e-3, early stopping on a 10% split); ITI and steering never see a label
of Bob's. CE is measured on the demo's neutral text with each edit at every position (as the README's ITI row)
and, for the ReFTs, at their own positions. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import intervene as iv
from intervene.assets import resolve_model_name
from intervene.data.quirky import quirky_dataset
from intervene.demo import _accuracy, _by_character, elicit_by_layer
from intervene.evaluate.side_effects import load_reference_texts, side_effects
from intervene.probes import MeanDiffProbe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["addition", "comparison", "facts"])
    ap.add_argument("--site", default="layers.0")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = iv.demo_model()
    tok.padding_side = "left"
    neutral = load_reference_texts(Path(resolve_model_name("demo")) / "neutral_eval.txt", n=200)
    table = []
    for task in args.tasks:
        torch.manual_seed(0)
        train = quirky_dataset(task, split="train", n=300, seed=0)
        test = quirky_dataset(task, split="test", n=150, seed=1)
        bob, alice = _by_character(test, "Bob"), _by_character(test, "Alice")
        layer_rows, _, persona_x = elicit_by_layer(model, tok, train, test, 64, False)
        alice_train = _by_character(train, "Alice")
        iti = iv.ITI.fit(model, tok, alice_train, num_heads=8, alpha=1.5, batch_size=64, progress=False)
        n_alice = len(alice_train)
        is_alice = torch.cat([torch.ones(n_alice), torch.zeros(persona_x.shape[1] - n_alice)]).long()
        persona = MeanDiffProbe().fit(persona_x, is_alice)
        layer = int(max(layer_rows, key=lambda r: r["auroc"])["layer"])
        d = persona.direction_[layer]
        gap = float((persona_x[layer][is_alice == 1].mean(0) - persona_x[layer][is_alice == 0].mean(0)) @ d)
        steer = iv.Steering.from_probe(persona, f"layers.{layer}", scale=gap, index=layer, name="persona")
        rows = [{"text": r["text"], "target": r["choices"][r["label"]]} for r in train]
        edits: list[tuple[str, iv.Intervention | None, bool]] = [
            ("base model", None, False), ("ITI (K=8, α=1.5; Alice only)", iti, False),
            (f"persona steering (layer {layer}, scale {gap:.2f})", steer, False)]
        for cls in (iv.LoReFT, iv.DiReFT):
            for positions in ("last", "all"):
                t0 = time.perf_counter()
                x = cls.fit(model, tok, rows, args.site, rank=args.rank, positions=positions, progress=False,
                            name=f"{cls.__name__.lower()}_{positions}")
                print(f"{task}: {cls.__name__} at {positions} trained in {time.perf_counter() - t0:.1f}s "
                      f"(best step {x.config['best_step']})", flush=True)
                edits.append((f"{cls.__name__} (rank {args.rank}, {args.site}, positions {positions!r}; supervised)",
                               x, positions != "all"))
        for label, edit, own in edits:
            with iv.Intervenable(model, [edit] if edit is not None else []):
                row = {"task": task, "method": label, "bob_vs_truth": _accuracy(model, tok, bob),
                       "alice_vs_truth": _accuracy(model, tok, alice)}
            if edit is not None:
                fx = side_effects(model, tok, neutral, edit, batch_size=64, positions="all")
                row.update(ce_delta_all=fx["ce_delta"], kl_all=fx["kl"])
                if own:
                    own_fx = side_effects(model, tok, neutral, edit, batch_size=64, positions=None)
                    row.update(ce_delta_own=own_fx["ce_delta"])
            table.append(row)
            print(json.dumps(row), flush=True)
    print("\n| task | method | Bob vs truth | Alice vs truth | CE Δ, edit at every position | CE Δ, own positions |")
    print("|---|---|---|---|---|---|")
    for r in table:
        ce = f"{r['ce_delta_all']:+.3f}" if "ce_delta_all" in r else "—"
        own = f"{r['ce_delta_own']:+.3f}" if "ce_delta_own" in r else "—"
        print(f"| {r['task']} | {r['method']} | {r['bob_vs_truth']:.3f} | {r['alice_vs_truth']:.3f} | {ce} | {own} |")
    if args.out:
        Path(args.out).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
