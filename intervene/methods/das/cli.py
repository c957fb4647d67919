"""``intervene das fit | eval``: distributed alignment search from the command line.

    intervene das fit demo quirky:addition --site layers.0 --k 1 --out runs/das
    intervene das fit demo quirky:addition --site layers.0 --boundless --out runs/bdas
    intervene das eval demo runs/das quirky:addition

MODEL: a local directory, a Hub id, or ``demo``. DATA: ``quirky:<task>`` (speaker-swap pairs: an Alice prompt
and a Bob prompt on different questions; the counterfactual is the source speaker's answer to the base
question; train / test questions are disjoint) or a ``.jsonl`` file of ``{"base", "source", "counterfactual"}``
pairs (optionally ``"choices"``), split by ``--test-fraction``. ``fit`` writes the diff and ``metrics.json``:
the training history and held-out IIA beside a random rotation of the same ``k`` and no intervention.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from intervene.command import (
    add_checkpoint_arguments,
    add_command_group,
    add_config_arguments,
    add_model_arguments,
    add_progress_argument,
    config_from_args,
    guard,
    load_model_args,
    load_single,
)
from intervene.methods.das.config import DASConfig


def _model_args(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-train", type=int, default=400, help="quirky: training questions (two pairs each)")
    p.add_argument("--n-eval", type=int, default=200, help="held-out questions (quirky) or pairs (default 200)")
    p.add_argument("--test-fraction", type=float, default=0.2, help=".jsonl: fraction of pairs held out")
    p.add_argument("--positions", type=int, nargs="+", default=[-1], help="own-token indices interchanged in each "
                                                                          "base and source (default -1: the last)")


def register(subparsers: Any) -> None:
    sub = add_command_group(subparsers, "das", help="distributed alignment search: fit, evaluate (IIA)",
                                description='Distributed alignment search (Geiger et al. 2023): learn a rotation whose first k dimensions, interchanged between a base and a source prompt, carry a causal variable; report the interchange intervention accuracy (IIA) on held-out pairs against a random rotation.')

    p = sub.add_parser("fit", help="train a rotation; write the diff and metrics.json", description='Train a rotation; write the diff and metrics.json.')
    _model_args(p)
    p.add_argument("data", help="quirky:<task> or a .jsonl of pairs")
    p.add_argument("--site", required=True, help="where to interchange, e.g. layers.0 or layers.0.heads")
    p.add_argument("--out", required=True, help="output directory")
    add_config_arguments(p, DASConfig)
    _data_args(p)
    add_checkpoint_arguments(p)
    add_progress_argument(p)
    p.set_defaults(func=guard(_fit))

    p = sub.add_parser("eval", help="IIA of a saved DAS on held-out pairs", description='IIA of a saved DAS on held-out pairs.')
    _model_args(p)
    p.add_argument("diff", help="diff directory or Hub repo written by `das fit`")
    p.add_argument("data", help="quirky:<task> (its test questions) or a .jsonl of pairs")
    _data_args(p)
    p.add_argument("--seed", type=int, default=0, help="seeds the data sample (default 0)")
    p.add_argument("--out", default=None, help="also write the metrics JSON here")
    p.set_defaults(func=guard(_eval))


def load_pairs(spec: str, part: str, n: int, seed: int = 0, test_fraction: float = 0.2) -> list[dict[str, Any]]:
    """Pairs of DATA: ``part`` is ``"train"`` or ``"test"`` (quirky: disjoint questions; .jsonl: a seeded split)."""
    from intervene.methods.das.evaluate import speaker_swap_pairs

    if spec.startswith("quirky:"):
        from intervene.data.quirky import quirky_dataset

        rows = quirky_dataset(spec.split(":", 1)[1], split=part, n=n, seed=seed if part == "train" else seed + 1)
        return speaker_swap_pairs(rows, seed=seed)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"{spec}: not quirky:<task> and not a file")
    pairs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(pairs)
    cut = round(len(pairs) * test_fraction)
    picked = pairs[:cut] if part == "test" else pairs[cut:]
    return picked[:n]


def _fit(args: argparse.Namespace) -> int:
    from intervene.intervenable import Intervenable
    from intervene.methods.das.evaluate import iia
    from intervene.methods.das.intervention import DAS

    model, tok = load_model_args(args)
    cfg = config_from_args(DASConfig, args)
    train = load_pairs(args.data, "train", args.n_train, cfg.seed, args.test_fraction)
    test = load_pairs(args.data, "test", args.n_eval, cfg.seed, args.test_fraction)
    das = DAS.fit(model, tok, train, args.site, cfg, positions=args.positions, progress=not args.no_progress,
                  checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    control = DAS.create(model, args.site, das.k, positions=args.positions, seed=cfg.seed + 1, name="control")
    held = iia(das, model, tok, test, positions=args.positions)
    result: dict[str, Any] = {"history": das.history_, "k": das.k, "held_out": held,
              "random_rotation": iia(control, model, tok, test, positions=args.positions)}
    out = Path(args.out)
    ivm = Intervenable(model, [das], attach=False)
    ivm.metadata = {"method": "DAS (Geiger et al. 2023)" + (" boundless" if cfg.boundless else ""),
                    "data": args.data, "site": args.site, "k": das.k, "held_out_iia": round(held["iia"], 4)}
    ivm.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"DAS at {args.site} (k={das.k}): held-out IIA {held['iia']:.3f} (random rotation "
          f"{result['random_rotation']['iia']:.3f}, no intervention {held['no_intervention']:.3f}); wrote {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from intervene.methods.das.evaluate import iia
    from intervene.methods.das.intervention import DAS

    model, tok = load_model_args(args)
    das = load_single(args.diff, model, DAS, "DAS interventions")
    test = load_pairs(args.data, "test", args.n_eval, args.seed, args.test_fraction)
    report = iia(das, model, tok, test, positions=args.positions)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
