"""``intervene reft fit | eval``: LoReFT / DiReFT from the command line.

    intervene reft fit demo quirky:addition --site layers.0 --rank 4 --out runs/reft
    intervene reft eval demo runs/reft quirky:addition

MODEL: a local directory, a Hub id, or ``demo``. DATA: ``quirky:<task>`` (each prompt's target is the truth,
``--character`` keeps one persona's rows; train / test questions are disjoint) or a ``.jsonl`` of
``{"text", "target"}`` rows. ``fit`` writes the diff and ``metrics.json`` (history; for quirky data each
character's held-out accuracy against the truth, base and edited, and the CE/KL cost on ``--ref-texts``).
"""

from __future__ import annotations

import argparse
import json
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
from intervene.methods.reft.config import ReFTConfig


def _model_args(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--character", default=None, help="quirky: train on this persona's rows only (Alice or Bob)")
    p.add_argument("--n-train", type=int, default=400, help="quirky: training questions (default 400)")
    p.add_argument("--n-eval", type=int, default=150, help="quirky: held-out questions (default 150)")
    p.add_argument("--ref-texts", default=None, help="reference text file for CE/KL (default: the demo model's "
                                                     "neutral_eval.txt)")
    p.add_argument("--n-ref", type=int, default=200, help="reference texts used for CE/KL (default 200)")


def register(subparsers: Any) -> None:
    sub = add_command_group(subparsers, "reft", help="representation fine-tuning (LoReFT, DiReFT): fit, evaluate",
                                description='Representation fine-tuning (Wu et al. 2024): train a LoReFT or DiReFT edit at one site with the model frozen, so each prompt is answered with its target; report accuracy per character and the CE cost on reference text.')

    p = sub.add_parser("fit", help="train a LoReFT / DiReFT; write the diff and metrics.json", description='Train a LoReFT / DiReFT; write the diff and metrics.json.')
    _model_args(p)
    p.add_argument("data", help="quirky:<task> or a .jsonl of {text, target} rows")
    p.add_argument("--site", required=True, help="where to edit, e.g. layers.1 or layers.0.heads")
    p.add_argument("--out", required=True, help="output directory")
    add_config_arguments(p, ReFTConfig)
    _data_args(p)
    add_checkpoint_arguments(p)
    add_progress_argument(p)
    p.set_defaults(func=guard(_fit))

    p = sub.add_parser("eval", help="accuracy against the truth per character, and CE/KL on reference text", description='Accuracy against the truth per character, and CE/KL on reference text.')
    _model_args(p)
    p.add_argument("diff", help="diff directory or Hub repo written by `reft fit`")
    p.add_argument("data", help="quirky:<task> (its test questions)")
    _data_args(p)
    p.add_argument("--out", default=None, help="also write the metrics JSON here")
    p.set_defaults(func=guard(_eval))


def training_rows(spec: str, n: int, character: str | None, seed: int) -> list[dict[str, Any]]:
    """``{"text", "target"}`` rows: quirky prompts with the truth as target, or a ``.jsonl`` file's rows."""
    if spec.startswith("quirky:"):
        from intervene.data.quirky import quirky_dataset

        chars = (character,) if character else ("Alice", "Bob")
        rows = quirky_dataset(spec.split(":", 1)[1], split="train", n=n, seed=seed, characters=chars)
        return [{"text": r["text"], "target": r["choices"][r["label"]]} for r in rows]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"{spec}: not quirky:<task> and not a file")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]


def quirky_report(model: Any, tok: Any, reft: Any, task: str, n: int, ref_texts: str | None, n_ref: int,
                  seed: int = 1) -> dict[str, Any]:
    """Held-out accuracy against the truth of Bob and Alice, base and edited, and CE/KL on reference text
    (with the edit at its own positions and at every position)."""
    from intervene.data.quirky import quirky_dataset
    from intervene.evaluate.choices import choice_logits
    from intervene.evaluate.side_effects import load_reference_texts, side_effects
    from intervene.intervenable import Intervenable

    rows = quirky_dataset(task, split="test", n=n, seed=seed)
    out: dict[str, Any] = {}
    for who in ("Bob", "Alice"):
        sub = [r for r in rows if r["character"] == who]
        truth = [r["label"] for r in sub]
        base = choice_logits(model, tok, sub).argmax(-1).tolist()
        with Intervenable(model, [reft]):
            edited = choice_logits(model, tok, sub).argmax(-1).tolist()
        out[who] = {"base": sum(a == b for a, b in zip(base, truth)) / len(sub),
                    "edited": sum(a == b for a, b in zip(edited, truth)) / len(sub), "n": len(sub)}
    texts = load_reference_texts(ref_texts, n=n_ref)
    out["side_effects_own_positions"] = side_effects(model, tok, texts, reft, positions=None)
    out["side_effects_all_positions"] = side_effects(model, tok, texts, reft, positions="all")
    return out


def _fit(args: argparse.Namespace) -> int:
    from intervene.intervenable import Intervenable
    from intervene.methods.reft.intervention import DiReFT, LoReFT

    model, tok = load_model_args(args)
    cfg = config_from_args(ReFTConfig, args)
    cls = LoReFT if cfg.variant == "loreft" else DiReFT
    reft = cls.fit(model, tok, training_rows(args.data, args.n_train, args.character, cfg.seed), args.site, cfg,
                   progress=not args.no_progress, checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    result: dict[str, Any] = {"history": reft.history_}
    if args.data.startswith("quirky:"):
        result["held_out"] = quirky_report(model, tok, reft, args.data.split(":", 1)[1], args.n_eval,
                                           args.ref_texts, args.n_ref)
    out = Path(args.out)
    ivm = Intervenable(model, [reft], attach=False)
    ivm.metadata = {"method": f"{cfg.variant} (Wu et al. 2024)", "data": args.data, "site": args.site,
                    "rank": cfg.rank}
    ivm.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    held = result.get("held_out")
    line = (f"Bob vs truth {held['Bob']['base']:.3f} -> {held['Bob']['edited']:.3f}, Alice "
            f"{held['Alice']['edited']:.3f}" if held else "trained")
    print(f"{cfg.variant} at {args.site} (rank {cfg.rank}): {line}; wrote {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from intervene.methods.reft.intervention import _ReFT

    model, tok = load_model_args(args)
    reft = load_single(args.diff, model, _ReFT, "ReFT interventions")
    if not args.data.startswith("quirky:"):
        raise ValueError("reft eval reads quirky:<task> data")
    report = quirky_report(model, tok, reft, args.data.split(":", 1)[1], args.n_eval, args.ref_texts, args.n_ref)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
