"""``intervene remedi fit | eval``: REMEDI learned representation editors from the command line.

    intervene remedi fit demo quirky:facts --layer 0 --side input --lr 3e-3 --epochs 10 --n-train 400 \
        --out runs/remedi
    intervene remedi eval demo runs/remedi quirky:facts

MODEL: a local directory, a Hub id, or ``demo``. DATA: a CounterFact-format JSON / JSON-lines file
(ROME's ``requested_rewrite`` records; split by subject into fit / held-out parts) or ``quirky:facts``
(the demo world's counterfactual edits; train / test entities are disjoint). ``fit`` writes the diff
(``intervene_config.json`` + ``intervene_weights.safetensors`` + card) and ``metrics.json`` (training
history, held-out metrics and the inspection figures for ``quirky:facts``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from intervene.command import (
    RAW,
    Steps,
    add_command_group,
    add_config_arguments,
    add_model_arguments,
    add_progress_argument,
    config_from_args,
    describe,
    guard,
    load_model_args,
    load_single,
    progress_of,
    write_json,
)
from intervene.methods.remedi.config import RemediConfig

DATA_HELP = "a CounterFact JSON / JSON-lines file, or quirky:facts (the demo world's counterfactual edits)"
NOTE = """\
DATA: a CounterFact-format JSON or JSON-lines file (ROME's requested_rewrite records, split by subject into
fitting and held-out parts) or quirky:facts (the demo world's counterfactual edits; the fitting and held-out
entities are disjoint)."""
EXAMPLES = __doc__.split("\n\n")[1]


def _model_args(p: argparse.ArgumentParser, batch_and_seed: bool = True) -> None:
    add_model_arguments(p)
    add_progress_argument(p)
    if batch_and_seed:  # `fit` takes both from RemediConfig
        p.add_argument("--batch-size", type=int, default=RemediConfig.batch_size,
                       help=f"examples per forward pass (default {RemediConfig.batch_size})")
        p.add_argument("--seed", type=int, default=RemediConfig.seed, help="seeds the sample split (default "
                                                                           f"{RemediConfig.seed})")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-eval", type=int, default=200, help="held-out samples to evaluate (default 200)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation length for fluency (default 32)")
    p.add_argument("--no-fluency", action="store_true", help="skip generations (faster)")


def register(subparsers: Any) -> None:
    """Add ``remedi`` (``fit``, ``eval``) to the ``intervene`` command."""
    sub = add_command_group(subparsers, "remedi", help="REMEDI learned representation editors: fit, evaluate",
                                description=describe(
                                    "REMEDI (Hernandez, Li & Andreas, 2023): learn an editor that maps a "
                                    "description of a new attribute to a change of an entity's hidden state, "
                                    "so the model then treats the entity as having that attribute.",
                                    EXAMPLES, NOTE), formatter_class=RAW)

    p = sub.add_parser("fit", help="train an editor; write the diff and metrics.json",
                       description=describe(
                           "Train a REMEDI editor at one block and write OUT: the diff (intervene_config.json, "
                           "intervene_weights.safetensors, README.md) and metrics.json (training history, held-out "
                           "efficacy / paraphrase / neighborhood / fluency, and for quirky:facts what the edited "
                           "states decode to).", NOTE), formatter_class=RAW)
    _model_args(p, batch_and_seed=False)
    p.add_argument("data", help=DATA_HELP)
    p.add_argument("--layer", type=int, required=True, help="edit the output (or, with --side input, the input) "
                                                            "of this block")
    p.add_argument("--out", required=True, help="output directory")
    add_config_arguments(p, RemediConfig)
    p.add_argument("--n-train", type=int, default=1000, help="training samples (default 1000)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="CounterFact: fraction of subjects held out for evaluation (default 0.2)")
    _eval_args(p)
    p.set_defaults(func=guard(_fit))

    p = sub.add_parser("eval", help="efficacy / paraphrase / neighborhood / fluency of a saved editor",
                       description=describe(
                           "Evaluate a saved REMEDI editor against the unedited model on held-out samples: "
                           "efficacy, paraphrase, neighborhood and fluency, with 95% intervals. Prints a summary "
                           "and writes the numbers as JSON (default: DIFF/eval_<data>.json).", NOTE),
                       formatter_class=RAW)
    _model_args(p)
    p.add_argument("diff", help="diff directory or Hub repo written by `remedi fit`")
    p.add_argument("data", help=f"{DATA_HELP} (its held-out split)")
    p.add_argument("--alpha", type=float, default=None, help="override the editor's alpha")
    p.add_argument("--out", default=None, help="JSON file for the results (default: DIFF/eval_<data>.json, or "
                                               "./remedi_eval_<data>.json for a Hub diff)")
    _eval_args(p)
    p.set_defaults(func=guard(_eval))


def load_samples(spec: str, part: str, n: int | None, seed: int = 0, test_fraction: float = 0.2
                 ) -> list[dict[str, Any]]:
    """Samples of DATA: ``part`` is ``"train"``, ``"test"`` or ``"all"`` (CounterFact only)."""
    if spec.startswith("quirky:"):
        if spec != "quirky:facts":
            raise ValueError(f"REMEDI needs entity facts: use quirky:facts, not {spec}")
        from intervene.data.quirky import facts_table, remedi_samples
        from intervene.methods.remedi.evaluate import add_neighbor_entities

        samples = remedi_samples("test" if part == "test" else "train", n=n or 200, seed=seed)
        return add_neighbor_entities(samples, list(facts_table()))
    from intervene.data.counterfact import load_counterfact, split_samples

    samples = load_counterfact(spec)
    if part != "all":
        train, test = split_samples(samples, test_fraction, seed)
        samples = train if part == "train" else test
    return samples[:n] if n is not None else samples


def _summary(report: dict[str, Any]) -> str:
    parts = []
    for key in ("efficacy_score", "paraphrase_score", "neighborhood_score", "neighborhood_transfer_score",
                "fluency"):
        e, b = report["edited"].get(key), report["unedited"].get(key)
        if e and e["estimate"] is not None:
            parts.append(f"{key} {e['estimate']:.3f} [{e['lower']:.3f}, {e['upper']:.3f}] (unedited {b['estimate']:.3f})")
    return "; ".join(parts)


def _fit(args: argparse.Namespace) -> int:
    from intervene.intervenable import Intervenable
    from intervene.methods.remedi.evaluate import evaluate_remedi
    from intervene.methods.remedi.intervention import Remedi

    steps = Steps(args, 4)
    steps("loading the model")
    model, tok = load_model_args(args)
    train = load_samples(args.data, "train", args.n_train, args.seed, args.test_fraction)
    test = load_samples(args.data, "test", args.n_eval, args.seed, args.test_fraction)
    steps(f"training the editor on {len(train)} samples")
    editor = Remedi.fit(model, tok, train, args.layer, config_from_args(RemediConfig, args),
                        progress=progress_of(args))
    result: dict[str, Any] = {"history": editor.history_, "best_epoch": editor.best_epoch_,
                              "n_train": editor.n_train_, "n_val": editor.n_val_}
    steps(f"evaluating on {len(test)} held-out samples")
    if test:
        result["held_out"] = evaluate_remedi(editor, model, tok, test, fluency=not args.no_fluency,
                                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                             seed=args.seed)
    if args.data == "quirky:facts":
        from intervene.methods.remedi.inspect import inspect_attributes, quirky_items

        result["inspection"] = inspect_attributes(editor, model, tok, quirky_items("test"), seed=args.seed,
                                                  batch_size=args.batch_size)
    steps("writing the diff and metrics.json")
    out = Path(args.out)
    ivm = Intervenable(model, [editor], attach=False)
    held = result.get("held_out", {}).get("edited", {})
    ivm.metadata = {"method": "REMEDI (Hernandez, Li & Andreas, 2023)", "data": args.data,
                    "site": editor.site, "n_train": editor.n_train_, "best_epoch": editor.best_epoch_,
                    **{f"held_out_{k}": round(v["estimate"], 4) for k, v in held.items()
                       if v.get("estimate") is not None}}
    ivm.save_pretrained(out)
    write_json(out / "metrics.json", result)
    line = _summary(result["held_out"]) if test else "no held-out samples"
    print(f"REMEDI at {editor.site} (best epoch {editor.best_epoch_}): {line}. Wrote the diff and metrics.json "
          f"to {out} ({steps.elapsed():.0f} s).")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from intervene.data.loaders import dataset_slug
    from intervene.hubio import resolve_diff_dir
    from intervene.intervenable import Intervenable
    from intervene.methods.remedi.evaluate import evaluate_remedi
    from intervene.methods.remedi.intervention import Remedi

    steps = Steps(args, 2)
    diff = resolve_diff_dir(args.diff)  # a missing diff is reported before the model loads
    steps("loading the model and the editor")
    model, tok = load_model_args(args)
    editor = load_single(str(diff), model, Remedi, "REMEDI editors", args.alpha)
    part = "test" if args.data.startswith("quirky:") else "all"
    samples = load_samples(args.data, part, args.n_eval, args.seed)
    steps(f"evaluating on {len(samples)} held-out samples" + ("" if args.no_fluency else " (with generations)"))
    ivm = Intervenable(model, [editor], attach=False)  # only the editor: other edits would confound
    report = evaluate_remedi(editor, ivm, tok, samples, fluency=not args.no_fluency,
                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    report["alpha"] = editor.alpha
    name = dataset_slug(args.data)
    path = Path(args.out) if args.out else (Path(args.diff) / f"eval_{name}.json" if Path(args.diff).is_dir()
                                            else Path(f"remedi_eval_{name}.json"))
    write_json(path, report)
    print(f"REMEDI at {editor.site}, {len(samples)} samples: {_summary(report)}. Wrote {path} "
          f"({steps.elapsed():.0f} s).")
    return 0
