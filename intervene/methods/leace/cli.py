"""``intervene erase fit | quirky``: LEACE concept erasure from the command line.

    intervene erase fit demo quirky:addition --sites layers.1.heads --label-field character --out runs/erase
    intervene erase quirky demo --task addition --sites layers.0 layers.1 layers.2 layers.3 --out runs/erase.json

MODEL: a local directory, a Hub id, or ``demo``. DATASET: ``quirky:<task>`` or a local ``.jsonl`` with a
``text`` field and the label field. ``fit`` writes a diff (``Intervenable.load`` / ``intervene bake`` read it);
``quirky`` fits a speaker eraser per site and prints how far Bob's answers move toward Alice's and the CE cost.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from intervene.command import (
    add_command_group,
    add_config_arguments,
    add_model_arguments,
    config_from_args,
    guard,
    load_model_args,
)
from intervene.methods.leace.config import ConceptErasureConfig


def _model_args(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, batch_size=16)


def register(subparsers: Any) -> None:
    sub = add_command_group(subparsers, "erase", help="LEACE concept erasure: fit an eraser, erase the quirky speaker",
                                description="LEACE concept erasure (Belrose et al. 2023): fit an eraser that removes every linear trace of a label (e.g. the quirky speaker) at a site, save it as a diff, or erase the speaker site by site and report how Bob's answers move and what it costs.")

    p = sub.add_parser("fit", help="fit one LEACE eraser per site and write the diff", description='Fit one LEACE eraser per site and write the diff.')
    _model_args(p)
    p.add_argument("dataset", help="quirky:<task> or a local .jsonl")
    p.add_argument("--sites", nargs="+", required=True, help="sites to erase at (wildcards allowed)")
    p.add_argument("--label-field", default="label", help="the row field holding the concept (default label; "
                                                          "'character' erases the quirky speaker)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="dataset split the eraser is fitted on")
    p.add_argument("--n", type=int, default=None, help="at most this many rows")
    p.add_argument("--seed", type=int, default=0, help="seeds the row sample with --n (default 0)")
    add_config_arguments(p, ConceptErasureConfig, exclude=("positions",))
    p.add_argument("--out", required=True, help="output directory of the diff")
    p.set_defaults(func=guard(_fit))

    p = sub.add_parser("quirky", help="erase the speaker at each site; Bob toward Alice and the CE cost", description='Erase the speaker at each site; Bob toward Alice and the CE cost.')
    _model_args(p)
    p.add_argument("--task", default="addition", choices=["addition", "comparison", "facts"], help="quirky task (default addition)")
    p.add_argument("--sites", nargs="+", default=["layers.0", "layers.1", "layers.2", "layers.3"], help="sites to erase the speaker at, one at a time")
    p.add_argument("--n-fit", type=int, default=300, help="train questions to fit on (default 300)")
    p.add_argument("--n-eval", type=int, default=200, help="test questions to score (default 200)")
    p.add_argument("--n-ref", type=int, default=100, help="reference texts for the CE cost (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data sample (default 0)")
    add_config_arguments(p, ConceptErasureConfig, exclude=("positions",))
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.set_defaults(func=guard(_quirky))


def _fit(args: argparse.Namespace) -> int:
    from intervene.data.loaders import load_dataset_rows
    from intervene.intervenable import Intervenable
    from intervene.methods.leace.intervention import ConceptErasure

    model, tok = load_model_args(args)
    rows = load_dataset_rows(args.dataset, split=args.split, n=args.n, seed=args.seed)
    if not rows:
        raise ValueError(f"{args.dataset} ({args.split}) has no rows")
    eraser = ConceptErasure.fit(model, tok, rows, args.sites, config_from_args(ConceptErasureConfig, args),
                                label_field=args.label_field, batch_size=args.batch_size)
    ivm = Intervenable(model, [eraser], attach=False)
    ivm.metadata = {"method": "LEACE concept erasure (Belrose et al., 2023)", "dataset": args.dataset,
                    "concept": args.label_field}
    ivm.save_pretrained(args.out)
    ranks = ", ".join(f"{s}: rank {r}" for s, r in eraser.fit_info_["rank"].items())
    print(f"concept erasure of {args.label_field!r} {eraser.fit_info_['classes']} ({ranks}); wrote {args.out}")
    return 0


def _quirky(args: argparse.Namespace) -> int:
    from intervene.methods.leace.evaluate import speaker_erasure_sweep

    model, tok = load_model_args(args)
    results = speaker_erasure_sweep(model, tok, args.sites, task=args.task, n_fit=args.n_fit, n_eval=args.n_eval,
                                    n_ref=args.n_ref, seed=args.seed,
                                    config=config_from_args(ConceptErasureConfig, args))
    print(f"{'site':<16} {'Bob=Alice before':>16} {'after':>6} {'Alice truthful after':>21} {'CE +nats':>9} {'KL':>7}")
    for r in results:
        print(f"{r['site']:<16} {r['bob_as_alice_before']:>16.3f} {r['bob_as_alice_after']:>6.3f} "
              f"{r['alice_truthful_after']:>21.3f} {r['ce_delta']:>9.4f} {r['kl']:>7.4f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0
