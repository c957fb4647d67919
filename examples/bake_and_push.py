"""Bake an intervention into the weights and push a model that plain `transformers` loads.

    python examples/bake_and_push.py DIFF REPO_ID [--model demo] [--token hf_...] [--dry-run OUT_DIR]

`--dry-run OUT_DIR` bakes and saves locally instead of pushing (no network needed), then reloads the
baked model with vanilla `AutoModelForCausalLM` and prints the max logit difference to the hooked model.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

import intervene as iv
from intervene.assets import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("diff")
    ap.add_argument("repo_id", nargs="?")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--token", default=None)
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--dry-run", metavar="OUT_DIR", default=None)
    args = ap.parse_args()
    model, tok = load_model(args.model, progress=False)
    ivm = iv.Intervenable.load(args.diff, model)
    if args.dry_run is None:
        info = iv.bake_and_push(ivm, args.repo_id, tokenizer=tok, private=args.private, token=args.token)
        print("pushed:", info)
        return
    baked = ivm.bake()  # NotBakeableError, with the reason, if the edit cannot be exact
    baked.save_pretrained(args.dry_run)
    tok.save_pretrained(args.dry_run)
    plain = AutoModelForCausalLM.from_pretrained(args.dry_run).eval()
    batch = tok(["Alice: 12 is greater than 7. True or False?"], return_tensors="pt")
    with torch.no_grad():
        diff = (plain(**batch).logits - ivm(**batch).logits).abs().max()
    print(f"baked model saved to {args.dry_run}; max |logit diff| vs hooked = {float(diff):.2e}")


if __name__ == "__main__":
    main()
