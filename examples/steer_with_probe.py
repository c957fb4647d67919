"""Fit a probe on the demo model and steer Bob along its direction: his wrong answers turn truthful.

    python examples/steer_with_probe.py [--task addition] [--layer 1] [--probe persona|truth]

The demo model answers truthfully when a prompt names Alice and systematically wrong when it names Bob.
A persona probe separates Alice's prompts from Bob's at one layer; adding its direction to Bob's
prompts makes him answer like Alice. How much to add? A steering scale only means something relative
to the activations it is added to, so the script measures the activation norm at that layer and sweeps
the scale in units of it. What to look at: Bob's accuracy against the truth rising with the scale, and
the cost (cross-entropy on neutral text, with the edit at every position) rising with it; the line
marked "<- chosen" is the smallest scale reaching 90% of the best accuracy within 1 nat of CE.

--probe truth fits a truth probe on Alice's prompts instead. It reads the truth perfectly (AUROC 1.0 at
layers 1-2), yet steering along it barely moves Bob: a direction that reads a property is not always a
lever that writes it.
"""

from __future__ import annotations

import argparse

import torch

import intervene as iv
from intervene.assets import DEMO_MODEL_DIR
from intervene.data.quirky import quirky_dataset
from intervene.evaluate.choices import choice_logits
from intervene.evaluate.side_effects import load_reference_texts
from intervene.methods.steering import activation_norm, choose_scale, scale_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="addition", choices=("addition", "comparison", "facts"),
                    help="the quirky task (default addition)")
    ap.add_argument("--layer", type=int, default=1, help="block whose output is steered (default 1)")
    ap.add_argument("--probe", default="persona", choices=("persona", "truth"),
                    help="persona: Alice vs Bob (default); truth: true vs false statements, on Alice's prompts")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.4, 0.5, 0.75, -0.5],
                    help="scales to try, as fractions of the activation norm at the layer")
    args = ap.parse_args()

    model, tok = iv.demo_model()
    site = f"layers.{args.layer}"
    train = quirky_dataset(args.task, split="train", n=200)  # each question asked of Alice and of Bob
    if args.probe == "truth":
        train = [r for r in train if r["character"] == "Alice"]
    acts = iv.collect(model, tok, train, sites=site, positions="last", progress=False)
    labels = [r["character"] == "Alice" for r in train] if args.probe == "persona" else acts.labels
    probe = iv.probes.MeanDiffProbe().fit(acts[site], labels)  # direction_: a unit vector, towards Alice / true

    neutral = load_reference_texts(DEMO_MODEL_DIR / "neutral_eval.txt", n=100)
    norm = activation_norm(model, tok, neutral, site)
    bob = quirky_dataset(args.task, split="test", n=100, characters=("Bob",))
    truth = torch.tensor([r["label"] for r in bob])

    def bob_accuracy(steered_model) -> float:  # Bob's answers (the likelier choice) scored against the truth
        return float((choice_logits(steered_model, tok, bob).argmax(-1) == truth).float().mean())

    steer = iv.Steering.from_probe(probe, site, scale=0.0, positions="all")
    rows = scale_sweep(model, tok, steer, [f * norm for f in args.fractions], bob_accuracy, neutral)
    chosen = choose_scale(rows, max_ce_delta=1.0)
    print(f"{args.probe} probe at {site} (activation norm {norm:.1f}); Bob's accuracy against the truth, "
          f"and the CE cost on neutral text:")
    for r in rows:
        mark = "  <- chosen" if r is chosen else ""
        print(f"  scale {r['scale'] / norm:+.2f} x norm = {r['scale']:+6.1f}: Bob accuracy {r['effect']:.2f}, "
              f"CE {r['ce_delta']:+.3f} nats{mark}")
    base = rows[0]["effect"] if rows[0]["scale"] == 0 else min(r["effect"] for r in rows)
    gain, best = chosen["effect"] - base, max(r["effect"] for r in rows) - base
    print(f"Steering at {chosen['scale'] / norm:+.2f} x the norm moves Bob's accuracy by {gain:+.2f} "
          f"for {chosen['ce_delta']:+.2f} nats of CE.")
    if best < 0.1:
        print("Almost nothing at any scale: this direction reads the property, it does not write it.")
    elif gain < 0.1:
        print(f"Larger scales move it by up to {best:+.2f}, at more than 1 nat of CE: try scales in between.")

if __name__ == "__main__":
    main()
