"""``intervene iti fit | eval | sweep``: Inference-Time Intervention from the command line.

    intervene iti fit demo quirky:addition --character Alice --num-heads 8 --alpha 1.5 --out runs/iti
    intervene iti eval demo runs/iti quirky:addition --character Bob
    intervene iti sweep demo quirky:addition --character Alice --eval-character Bob \\
        --num-heads 4 8 16 --alphas 0 1 1.5 2 --out runs/iti-sweep

MODEL: a local directory, a Hub id, or ``demo``. DATASET: a local ``.jsonl`` (TruthfulQA
``multiple_choice`` rows, TruthfulQA generation rows, or ``text``/``label`` rows) or ``quirky:<task>``
(the quirky demo data; ``--character`` picks a persona; ``--labels speaker`` fits on the truthful
(Alice) vs untruthful (Bob) speaker contrast instead of each answer's truth). Side effects (CE/KL) are measured on
``--ref-texts`` (default: the demo model's ``neutral_eval.txt``), with the edit at every position.
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
from intervene.methods.iti.config import ITIConfig
from intervene.methods.iti.evaluate import DEFAULT_ALPHAS

DATASET_HELP = ("a TruthfulQA-style or text/label .jsonl file, or quirky:TASK (quirky:addition, "
                "quirky:comparison, quirky:facts)")
NOTE = """\
DATASET: a local .jsonl (TruthfulQA multiple_choice rows, TruthfulQA generation rows, or text/label rows)
or quirky:TASK, the demo model's data (--character picks Alice or Bob; --labels speaker fits on the
truthful-vs-untruthful speaker contrast instead of each answer's truth). Side effects (cross-entropy and
KL) are measured on --ref-texts (default: the demo model's neutral text) with the edit at every position."""
EXAMPLES = __doc__.split("\n\n")[1]


def _model_args(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, batch_size=16)
    add_progress_argument(p)


def _data_args(p: argparse.ArgumentParser, split: str, eval_too: bool = False) -> None:
    p.add_argument("--character", default=None, help="quirky: keep only this persona's rows (Alice or Bob)")
    p.add_argument("--n", type=int, default=None, help="at most this many rows (default: all)")
    p.add_argument("--split", default=split, choices=["train", "test"], help=f"dataset split (default {split})")
    if eval_too:
        p.add_argument("--eval-dataset", default=None, help="evaluation DATASET (default: DATASET, test split)")
        p.add_argument("--eval-character", default=None, help="persona of the evaluation rows")
        p.add_argument("--eval-n", type=int, default=None, help="at most this many evaluation rows")


def _fit_args(p: argparse.ArgumentParser, several_k: bool = False) -> None:
    if several_k:
        p.add_argument("--num-heads", "--ks", dest="ks", type=int, nargs="+", default=[ITIConfig.num_heads],
                       metavar="K", help=f"K values to sweep (default {ITIConfig.num_heads})")
        add_config_arguments(p, ITIConfig, exclude=("num_heads", "alpha"))
    else:
        add_config_arguments(p, ITIConfig)
    p.add_argument("--labels", default="answer", choices=["answer", "speaker"],
                   help="quirky data: label each prompt+answer by the answer's truth (default), or each prompt "
                        "by whether its speaker is truthful (Alice) or not (Bob)")


def _ref_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref-texts", default=None, help="reference text file, one text per line (default: the "
                                                     "demo model's neutral_eval.txt)")
    p.add_argument("--n-ref", type=int, default=200, help="reference texts used for CE/KL (default 200)")
    p.add_argument("--primer", default="none", choices=["none", "qa"],
                   help="TruthfulQA MC prompt primer: none, or the paper's QA primer (default none)")


def register(subparsers: Any) -> None:
    """Add ``iti`` (``fit``, ``eval``, ``sweep``) to the ``intervene`` command."""
    sub = add_command_group(subparsers, "iti", help="Inference-Time Intervention: fit, evaluate, sweep",
                                description=describe(
                                    "Inference-Time Intervention (Li et al., 2023): probe every attention head, "
                                    "pick the K whose probes separate true from false answers best, and shift "
                                    "them along their truth direction by alpha standard deviations.",
                                    EXAMPLES, NOTE), formatter_class=RAW)

    p = sub.add_parser("fit", help="fit ITI heads and directions; write the diff, a head heat map and metrics",
                       description=describe(
                           "Fit ITI on DATASET and write OUT: the diff (intervene_config.json, "
                           "intervene_weights.safetensors, README.md), report.html (a page with the head heat map "
                           "and the chosen heads), head_accuracies.png (validation accuracy of every head's probe; "
                           "the chosen heads outlined) and metrics.json.", NOTE),
                       formatter_class=RAW)
    _model_args(p)
    p.add_argument("dataset", help=f"the fitting data: {DATASET_HELP}")
    _data_args(p, "train")
    _fit_args(p)
    p.add_argument("--out", required=True, help="output directory (the diff, report.html, head_accuracies.png, "
                                                "metrics.json)")
    p.set_defaults(func=guard(_fit))

    p = sub.add_parser("eval", help="accuracy and CE/KL cost of a saved ITI diff against the base model",
                       description=describe(
                           "Evaluate a saved ITI diff against the base model: truthfulness on DATASET (MC1/MC2 "
                           "for TruthfulQA rows, accuracy for quirky rows) and the side effects on reference "
                           "text (cross-entropy and KL, the edit at every position). Prints a summary and "
                           "writes the numbers as JSON (default: DIFF/eval_<dataset>[_<character>].json).", NOTE),
                       formatter_class=RAW)
    _model_args(p)
    p.add_argument("diff", help="diff directory or Hub repo written by `iti fit`")
    p.add_argument("dataset", help=f"the evaluation data: {DATASET_HELP}")
    _data_args(p, "test")
    _ref_args(p)
    p.add_argument("--alpha", type=float, default=None, help="override the diff's alpha")
    p.add_argument("--seed", type=int, default=0, help="seeds the row sample with --n (default 0)")
    p.add_argument("--out", default=None, help="JSON file for the results (default: DIFF/eval_<dataset>[_<character>].json, "
                                               "or ./iti_eval_<dataset>.json for a Hub diff)")
    p.set_defaults(func=guard(_eval))

    p = sub.add_parser("sweep", help="sweep alpha and K: CSV table, trade-off plot, head heat map",
                       description=describe(
                           "Fit once with the largest K, then evaluate every (K, alpha): truthfulness against "
                           "CE/KL. Writes OUT/sweep.csv, sweep.json, tradeoff.png and head_accuracies.png.",
                           NOTE), formatter_class=RAW)
    _model_args(p)
    p.add_argument("dataset", help=f"the fitting data: {DATASET_HELP}")
    _data_args(p, "train", eval_too=True)
    _fit_args(p, several_k=True)
    p.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS),
                   help=f"alpha values to sweep (default {' '.join(f'{a:g}' for a in DEFAULT_ALPHAS)})")
    _ref_args(p)
    p.add_argument("--out", required=True, help="output directory (sweep.csv, sweep.json, tradeoff.png, "
                                                "head_accuracies.png)")
    p.set_defaults(func=guard(_sweep))


def _rows(spec: str, split: str, n: int | None, character: str | None, seed: int) -> list[dict]:
    from intervene.data.loaders import load_dataset_rows

    rows = load_dataset_rows(spec, split=split, n=n, seed=seed, character=character)
    if not rows:
        raise ValueError(f"{spec} ({split}, character={character}) has no rows")
    return rows


def _fit_model(args: argparse.Namespace, model: Any, tok: Any, num_heads: int | None = None) -> Any:
    from intervene.methods.iti.intervention import ITI

    rows = _rows(args.dataset, args.split, args.n, args.character, args.seed)
    if args.labels == "speaker":
        from intervene.data.quirky import speaker_contrast

        if not all("character" in r for r in rows):
            raise ValueError("--labels speaker needs quirky rows (with a 'character'): use quirky:<task>")
        rows = speaker_contrast(rows)
    overrides = {} if num_heads is None else {"num_heads": num_heads}
    return ITI.fit(model, tok, rows, config_from_args(ITIConfig, args, **overrides), batch_size=args.batch_size,
                   progress=progress_of(args))


def _fit_report(iti: Any) -> dict[str, Any]:
    return {"fit": iti.fit_info_, "alpha": iti.alpha, "top_heads": [list(h) for h in iti.heads],
            "head_accuracies": iti.head_accuracies_.tolist(), "train_accuracies": iti.train_accuracies_.tolist()}


def _fit(args: argparse.Namespace) -> int:
    from intervene.intervenable import Intervenable
    from intervene.methods.iti.plots import plot_head_accuracies
    from intervene.methods.iti.report import write_fit_report

    steps = Steps(args, 3)
    steps("loading the model")
    model, tok = load_model_args(args)
    steps(f"collecting head activations on {args.dataset} and fitting a probe per head")
    iti = _fit_model(args, model, tok)
    steps("writing the diff, report.html, head_accuracies.png and metrics.json")
    out = Path(args.out)
    ivm = Intervenable(model, [iti], attach=False)
    ivm.metadata = {"method": "ITI (Li et al., 2023)", "dataset": args.dataset, "character": args.character}
    ivm.save_pretrained(out)
    plot_head_accuracies(iti.head_accuracies_, out / "head_accuracies.png", iti.heads)
    write_json(out / "metrics.json", _fit_report(iti))
    write_fit_report(out, iti, args.dataset, out / "head_accuracies.png")
    best = ", ".join(f"L{lay}H{h} {a:.3f}" for (lay, h), a in zip(iti.heads[:5], iti.fit_info_["val_accuracy"]))
    print(f"ITI: shifted {len(iti.heads)} heads by alpha={iti.alpha:g} std (best probes, validation accuracy: "
          f"{best}). Wrote the diff, report.html, head_accuracies.png and metrics.json to {out} in "
          f"{steps.elapsed():.0f} s. Next: intervene iti eval {args.model} {out} {args.dataset}")
    return 0


def _ref_texts(args: argparse.Namespace) -> list[str]:
    from intervene.evaluate.side_effects import load_reference_texts

    return load_reference_texts(args.ref_texts, args.n_ref)


def _mc_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from intervene.evaluate.mc import QA_PRIMER

    return {"primer": QA_PRIMER} if args.primer == "qa" else {}


def _eval_path(args: argparse.Namespace) -> Path:
    from intervene.data.loaders import dataset_slug

    if args.out:
        return Path(args.out)
    name = dataset_slug(args.dataset) + (f"_{args.character}" if args.character else "")
    local = Path(args.diff)
    return local / f"eval_{name}.json" if local.is_dir() else Path(f"iti_eval_{name}.json")


def _eval(args: argparse.Namespace) -> int:
    from intervene.evaluate.mc import truthfulness
    from intervene.evaluate.side_effects import side_effects
    from intervene.hubio import resolve_diff_dir
    from intervene.intervenable import Intervenable
    from intervene.methods.iti.evaluate import truth_key
    from intervene.methods.iti.intervention import ITI

    steps = Steps(args, 4)
    diff = resolve_diff_dir(args.diff)  # a missing diff is reported before the model loads
    steps("loading the model and the diff")
    model, tok = load_model_args(args)
    iti = load_single(str(diff), model, ITI, "ITI interventions", args.alpha)
    rows = _rows(args.dataset, args.split, args.n, args.character, args.seed)
    kwargs = _mc_kwargs(args) if "question" in rows[0] else {}
    refs = _ref_texts(args)
    steps(f"truthfulness of the base model on {len(rows)} rows")
    base = truthfulness(model, tok, rows, batch_size=args.batch_size, **kwargs)
    steps(f"truthfulness with ITI (K={len(iti.heads)}, alpha={iti.alpha:g})")
    with Intervenable(model, [iti]) as ivm:
        edited = truthfulness(ivm, tok, rows, batch_size=args.batch_size, **kwargs)
    fx: dict[str, float] = {}
    if refs:
        steps(f"cross-entropy and KL on {len(refs)} reference texts, the edit at every position")
        fx = side_effects(model, tok, refs, iti, batch_size=args.batch_size)
    base_fx = {"ce_base": fx["ce_base"], "ce": fx["ce_base"], "ce_delta": 0.0, "kl": 0.0,
               "n_tokens": fx["n_tokens"]} if fx else {}
    result = {"base": {**base, **base_fx}, "iti": {**edited, **fx}, "alpha": iti.alpha,
              "num_heads": len(iti.heads), "n_rows": len(rows), "dataset": args.dataset, "character": args.character}
    path = write_json(_eval_path(args), result)
    key = truth_key([base])
    cost = (f"; CE on reference text {fx['ce_base']:.3f} -> {fx['ce']:.3f} nats ({fx['ce_delta']:+.3f}), "
            f"KL {fx['kl']:.3f}") if fx else ""
    who = f" ({args.character})" if args.character else ""
    print(f"ITI (K={len(iti.heads)}, alpha={iti.alpha:g}) on {args.dataset}{who}, {len(rows)} rows: {key} "
          f"{base[key]:.3f} -> {edited[key]:.3f}{cost}. Wrote {path} ({steps.elapsed():.0f} s).")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from intervene.methods.iti.evaluate import sweep, truth_key, write_csv
    from intervene.methods.iti.plots import plot_head_accuracies, plot_tradeoff

    ks = sorted(set(args.ks))
    steps = Steps(args, 3)
    steps("loading the model")
    model, tok = load_model_args(args)
    steps(f"fitting ITI with K={max(ks)} on {args.dataset}")
    iti = _fit_model(args, model, tok, max(ks))
    eval_spec = args.eval_dataset or args.dataset
    rows = _rows(eval_spec, "test", args.eval_n, args.eval_character or args.character, args.seed)
    kwargs = _mc_kwargs(args) if "question" in rows[0] else {}
    n_settings = 1 + len(ks) * len([a for a in args.alphas if a != 0.0])
    steps(f"evaluating {n_settings} settings (base + K x alpha) on {len(rows)} rows and the reference texts")
    table = sweep(model, tok, iti, rows, _ref_texts(args), alphas=args.alphas, num_heads=ks,
                  batch_size=args.batch_size, progress=progress_of(args), **kwargs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(table, out / "sweep.csv")
    key = truth_key(table)
    plot_tradeoff(table, out / "tradeoff.png", key)
    plot_head_accuracies(iti.head_accuracies_, out / "head_accuracies.png", iti.heads)
    write_json(out / "sweep.json", {"rows": table, **_fit_report(iti)})
    print(f"{'K':>4} {'alpha':>6} {key:>9} {'ce':>8} {'kl':>8}")
    for r in table:
        print(f"{r['num_heads']:>4} {r['alpha']:>6g} {r[key]:>9.4f} {r.get('ce', float('nan')):>8.4f} "
              f"{r.get('kl', float('nan')):>8.4f}")
    print(f"wrote {out / 'sweep.csv'}, {out / 'tradeoff.png'}, {out / 'head_accuracies.png'} "
          f"({steps.elapsed():.0f} s)")
    return 0
