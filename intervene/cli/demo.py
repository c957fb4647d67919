"""``intervene demo``: the end-to-end walkthrough on the shipped quirky model (offline, CPU)."""

from __future__ import annotations

import argparse
from typing import Any

from intervene.command import MODEL_HELP, guard

DESCRIPTION = """\
The end-to-end walkthrough, offline on the shipped quirky model (truthful when a prompt names Alice,
wrong when it names Bob):
  1. Bob's wrong answers next to Alice's right ones;
  2. truth probes fitted on Alice, evaluated per layer on Bob against the truth (AUROC, and the PGR
     between the floor, a probe fitted on Bob's own wrong labels, and the ceiling, Alice's own AUROC);
  3. ITI and a persona steering vector: Bob's accuracy and the cost (CE on neutral text);
  4. the ITI diff saved, reloaded, baked into the weights and checked under plain transformers.
Everything is written to --out (summary.json, CSVs, PNGs, report.html, the diff, the baked model)."""


def _run(args: argparse.Namespace) -> int:
    from intervene.demo import run_demo

    kw = dict(n_train=80, n_test=40) if args.quick else dict(n_train=args.n_train, n_test=args.n_test)
    run_demo(out=args.out, model_name=args.model, task=args.task, iti_heads=args.iti_heads,
             iti_alpha=args.iti_alpha, steer_scale=args.steer_scale, progress=not args.no_progress, **kw)
    return 0


def register(sub: Any) -> None:
    """Add ``demo`` to the ``intervene`` command."""
    p = sub.add_parser("demo", help="the end-to-end walkthrough on the shipped quirky model (offline, CPU)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="intervene-demo-out", help="output folder (default intervene-demo-out)")
    p.add_argument("--model", default="demo", help=f"{MODEL_HELP}; default demo")
    p.add_argument("--task", default="addition", choices=("addition", "comparison", "facts"),
                   help="which quirky task: sums, number comparisons, or facts about made-up people "
                        "(default addition)")
    p.add_argument("--n-train", type=int, default=300, help="questions for fitting, each asked of Alice and of Bob "
                                                            "(default 300)")
    p.add_argument("--n-test", type=int, default=150, help="held-out questions, each asked of Alice and of Bob "
                                                           "(default 150)")
    p.add_argument("--iti-heads", type=int, default=8, help="ITI: how many attention heads to shift (K, default 8)")
    p.add_argument("--iti-alpha", type=float, default=1.5,
                   help="ITI: shift strength, in units of each head's activation std along its direction "
                        "(alpha, default 1.5)")
    p.add_argument("--steer-scale", type=float, default=0.5,
                   help="persona steering strength, as a multiple of the gap between Alice's and Bob's mean "
                        "activations (default 0.5: Bob turns truthful; 1.0 costs about 6x more CE)")
    p.add_argument("--quick", action="store_true", help="a reduced run: 80 fitting and 40 held-out questions")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=guard(_run))
