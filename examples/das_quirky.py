"""DAS on the demo model: is there a low-dimensional subspace that carries "who is judging"?

    python examples/das_quirky.py                       # addition, layers 0-3, k in 1 2 4 8 32 128
    python examples/das_quirky.py --tasks addition comparison facts --out das_iia.json

Pairs (``intervene.methods.das.speaker_swap_pairs``): the base is one character's prompt on a question, the
source the other character's prompt on *another* question; the counterfactual is what the source's character
answers on the base question (Bob answers like Alice, and vice versa). A DAS at ``layers.{L}`` interchanges
the first ``k`` rotated dimensions of the last token's residual. For each (layer, k) it reports held-out IIA
of the trained rotation and of a random rotation of the same ``k`` (the control), beside the no-intervention
baseline (the base's own answer against the counterfactual). k = width is the full interchange (any rotation).
Train and test questions are disjoint. Prints a Markdown table; ``--out`` writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import intervene as iv
from intervene.data.quirky import quirky_dataset
from intervene.methods.das import DAS, BoundlessDAS, iia, speaker_swap_pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["addition"])
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 32, 128])
    ap.add_argument("--n-train", type=int, default=300, help="training questions (two pairs each)")
    ap.add_argument("--n-test", type=int, default=150, help="held-out questions (two pairs each)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--boundless", action="store_true", help="also fit a Boundless DAS per layer")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = iv.demo_model()
    results = []
    for task in args.tasks:
        train = speaker_swap_pairs(quirky_dataset(task, split="train", n=args.n_train, seed=0), seed=0)
        test = speaker_swap_pairs(quirky_dataset(task, split="test", n=args.n_test, seed=1), seed=1)
        for layer in args.layers:
            site = f"layers.{layer}"
            for k in args.ks:
                t0 = time.perf_counter()
                das = DAS.fit(model, tok, train, site, k=k, epochs=args.epochs, progress=False)
                got = iia(das, model, tok, test)
                control = iia(DAS.create(model, site, k, seed=1000 + k), model, tok, test)
                row = {"task": task, "layer": layer, "k": k, "iia": got["iia"], "iia_changed": got["iia_changed"],
                       "random_rotation": control["iia"], "random_rotation_changed": control["iia_changed"],
                       "no_intervention": got["no_intervention"], "n": got["n"], "n_changed": got["n_changed"],
                       "seconds": round(time.perf_counter() - t0, 1)}
                results.append(row)
                print(json.dumps(row), flush=True)
            if args.boundless:
                t0 = time.perf_counter()
                b = BoundlessDAS.fit(model, tok, train, site, epochs=args.epochs + 1, boundary_init=0.1, progress=False)
                got = iia(b, model, tok, test)
                row = {"task": task, "layer": layer, "k": f"boundless ({b.k})", "iia": got["iia"],
                       "iia_changed": got["iia_changed"], "random_rotation": None, "random_rotation_changed": None,
                       "no_intervention": got["no_intervention"], "n": got["n"], "n_changed": got["n_changed"],
                       "seconds": round(time.perf_counter() - t0, 1)}
                results.append(row)
                print(json.dumps(row), flush=True)
    print("\n| task | layer | k | IIA (trained) | IIA (random rotation) | IIA on changed pairs (trained / random) | "
          "no intervention |\n|---|---|---|---|---|---|---|")
    for r in results:
        rr = "—" if r["random_rotation"] is None else f"{r['random_rotation']:.3f}"
        rc = "—" if r["random_rotation_changed"] is None else f"{r['random_rotation_changed']:.3f}"
        print(f"| {r['task']} | {r['layer']} | {r['k']} | {r['iia']:.3f} | {rr} | {r['iia_changed']:.3f} / {rc} "
              f"| {r['no_intervention']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
