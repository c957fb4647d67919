"""Load a published intervention diff onto its base model and generate with it.

    python examples/load_diff_and_generate.py DIFF_DIR_OR_HUB_ID [--model demo] [--prompt "..."]

With no DIFF it first makes one (a steering vector on the shipped demo model) so the script runs
offline out of the box.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import intervene as iv
from intervene.assets import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("diff", nargs="?", help="a diff directory or Hub repo id")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--revision", default=None)
    ap.add_argument("--prompt", default="Bob: 37 is greater than 52. True or False?")
    args = ap.parse_args()
    model, tok = load_model(args.model, progress=False)
    diff = args.diff
    if diff is None:  # make a small diff to load
        diff = tempfile.mkdtemp(prefix="diff-")
        v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        iv.Intervenable(model, iv.Steering({"layers.1": v}, scale=2.0), attach=False).save_pretrained(diff)
    ivm = iv.Intervenable.load(diff, model, revision=args.revision)  # validated before any hook goes on
    batch = tok([args.prompt], return_tensors="pt")
    with ivm:
        steered = ivm.generate(**batch, max_new_tokens=12, do_sample=False)
        with ivm.disabled():
            base = ivm.generate(**batch, max_new_tokens=12, do_sample=False)
    n = batch["input_ids"].shape[1]
    print("interventions:", ivm.interventions)
    print("base:   ", tok.decode(base[0, n:]))
    print("steered:", tok.decode(steered[0, n:]))


if __name__ == "__main__":
    main()
