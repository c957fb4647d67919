"""``intervene demo``: the end-to-end walkthrough on the shipped quirky model (offline, CPU, minutes)."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from intervene.demo import run_demo

    kw = dict(n_train=80, n_test=40) if args.quick else dict(n_train=args.n_train, n_test=args.n_test)
    run_demo(out=args.out, model_name=args.model, task=args.task, iti_heads=args.iti_heads,
             iti_alpha=args.iti_alpha, steer_scale=args.steer_scale, progress=not args.no_progress, **kw)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="elicit, steer, publish and bake on the shipped quirky model")
    p.add_argument("--out", default="intervene-demo-out", help="output folder")
    p.add_argument("--model", default="demo", help="model dir / Hub id / 'demo'")
    p.add_argument("--task", default="addition", choices=("addition", "comparison", "facts"))
    p.add_argument("--n-train", type=int, default=300, help="questions for fitting (x2 characters)")
    p.add_argument("--n-test", type=int, default=150, help="held-out questions (x2 characters)")
    p.add_argument("--iti-heads", type=int, default=8)
    p.add_argument("--iti-alpha", type=float, default=1.5)
    p.add_argument("--steer-scale", type=float, default=1.0, help="multiple of the Alice-Bob mean gap")
    p.add_argument("--quick", action="store_true", help="a reduced run (tests use it)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)
