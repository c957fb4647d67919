"""Load a published intervention diff onto its base model and generate with it, next to the base model.

    python examples/load_diff_and_generate.py [DIFF_DIR_OR_HUB_ID] [--model demo] [--prompt "..."]

With no DIFF it first makes one on the shipped demo model, in a temporary folder it removes again:
a persona steering vector (from Bob's prompts towards Alice's, at half the activation norm) that makes
Bob, who answers wrongly, answer like the truthful Alice. What to look at: the base model's answer and
the steered one for a prompt that names Bob (with the demo's default prompt, "True" becomes "False",
the truth: 45 + 9 is not 64).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import intervene as iv
from intervene.assets import DEMO_MODEL_DIR, load_model


def make_persona_diff(model, tok, directory: Path) -> Path:
    """Save a persona steering diff for the demo model: Bob -> Alice at block 1, 0.5 x the activation norm."""
    from intervene.data.quirky import quirky_dataset
    from intervene.evaluate.side_effects import load_reference_texts
    from intervene.methods.steering import activation_norm

    rows = quirky_dataset("addition", split="train", n=100)  # each question asked of Alice and of Bob
    acts = iv.collect(model, tok, rows, sites="layers.1", positions="last", progress=False)
    probe = iv.probes.MeanDiffProbe().fit(acts["layers.1"], [r["character"] == "Alice" for r in rows])
    norm = activation_norm(model, tok, load_reference_texts(DEMO_MODEL_DIR / "neutral_eval.txt", n=50),
                           "layers.1")
    steer = iv.Steering.from_probe(probe, "layers.1", scale=0.5 * norm, name="bob_to_alice")
    ivm = iv.Intervenable(model, steer, attach=False)
    ivm.metadata = {"what": "persona steering, Bob -> Alice", "scale": "0.5 x activation norm at layers.1"}
    return ivm.save_pretrained(directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("diff", nargs="?", help="a diff directory or Hub repo id (default: make one for the demo model)")
    ap.add_argument("--model", default="demo", help="the diff's base model: a directory, a Hub id, or demo")
    ap.add_argument("--revision", default=None, help="revision of a Hub diff")
    ap.add_argument("--prompt", default="Bob: 45 + 9 = 64. True or False?", help="the prompt to complete")
    ap.add_argument("--max-new-tokens", type=int, default=1, help="tokens to generate (default 1: the answer)")
    args = ap.parse_args()
    model, tok = load_model(args.model, progress=False)
    with tempfile.TemporaryDirectory(prefix="diff-") as tmp:  # removed at the end, whatever happens
        diff = args.diff or make_persona_diff(model, tok, Path(tmp) / "persona-diff")
        ivm = iv.Intervenable.load(diff, model, revision=args.revision)  # validated before any hook goes on
    batch = tok([args.prompt], return_tensors="pt")
    with ivm:  # attached inside the block, detached (only our hooks) after it
        steered = ivm.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
        with ivm.disabled():
            base = ivm.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
    n = batch["input_ids"].shape[1]
    print("interventions:", ivm.interventions)
    print(f"prompt:  {args.prompt!r}")
    print(f"base:    {tok.decode(base[0, n:], skip_special_tokens=True)!r}")
    print(f"steered: {tok.decode(steered[0, n:], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
