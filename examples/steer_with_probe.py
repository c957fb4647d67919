"""Fit a truth probe on Alice's prompts of the demo model and steer Bob along its direction.

    python examples/steer_with_probe.py [--task comparison] [--layer 2] [--scale 8]
"""

from __future__ import annotations

import argparse

import torch

import intervene as iv
from intervene.data.quirky import quirky_dataset
from intervene.evaluate.choices import choice_logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="comparison")
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--scale", type=float, default=8.0)
    args = ap.parse_args()
    model, tok = iv.demo_model()
    site = f"layers.{args.layer}"
    alice = quirky_dataset(args.task, split="train", n=200, characters=("Alice",))
    acts = iv.collect(model, tok, alice, sites=site, positions="last", progress=False)
    probe = iv.probes.LogisticRegressionProbe().fit(acts[site], acts.labels)   # direction_: [hidden], unit
    bob = quirky_dataset(args.task, split="test", n=100, characters=("Bob",))
    truth = torch.tensor([r["label"] for r in bob])
    for scale in (0.0, args.scale, -args.scale):
        steer = iv.Steering.from_probe(probe, site, scale=scale, positions="all")
        with iv.Intervenable(model, steer):
            says_true = choice_logits(model, tok, bob).argmax(-1)
        print(f"scale {scale:+5.1f}: Bob says True on {says_true.float().mean():.2f} of statements; "
              f"accuracy vs truth {(says_true == truth).float().mean():.2f}")


if __name__ == "__main__":
    main()
