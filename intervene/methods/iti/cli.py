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
import json
from pathlib import Path
from typing import Any

from intervene.command import add_config_arguments, config_from_args, guard, load_model_args, load_single
from intervene.methods.iti.config import ITIConfig
from intervene.methods.iti.evaluate import DEFAULT_ALPHAS


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local dir, Hub id, or 'demo'")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, or auto")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default 16)")


def _data_args(p: argparse.ArgumentParser, split: str, eval_too: bool = False) -> None:
    p.add_argument("--character", default=None, help="quirky: keep only this persona's rows (Alice or Bob)")
    p.add_argument("--n", type=int, default=None, help="at most this many rows")
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
    p.add_argument("--primer", default="none", choices=["none", "qa"], help="TruthfulQA MC prompt primer")


def register(subparsers: Any) -> None:
    top = subparsers.add_parser("iti", help="Inference-Time Intervention: fit, evaluate, sweep",
                                description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="iti_command", metavar="ITI_COMMAND")
    top.set_defaults(func=lambda args: (top.print_help(), 2)[1])

    p = sub.add_parser("fit", help="fit ITI heads/directions and write the diff + plots + metrics")
    _model_args(p)
    p.add_argument("dataset")
    _data_args(p, "train")
    _fit_args(p)
    p.add_argument("--out", required=True, help="output directory (the diff, head_accuracies.png, metrics.json)")
    p.set_defaults(func=guard(_fit))

    p = sub.add_parser("eval", help="MC truthfulness and CE/KL of a saved ITI diff against the base model")
    _model_args(p)
    p.add_argument("diff", help="diff directory or Hub repo written by `iti fit`")
    p.add_argument("dataset")
    _data_args(p, "test")
    _ref_args(p)
    p.add_argument("--alpha", type=float, default=None, help="override the diff's α")
    p.add_argument("--seed", type=int, default=0, help="seeds the row sample with --n (default 0)")
    p.add_argument("--out", default=None, help="also write the metrics JSON here")
    p.set_defaults(func=guard(_eval))

    p = sub.add_parser("sweep", help="sweep α and K: CSV table, trade-off plot, head-accuracy heatmap")
    _model_args(p)
    p.add_argument("dataset", help="fitting DATASET")
    _data_args(p, "train", eval_too=True)
    _fit_args(p, several_k=True)
    p.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS), help="α values to sweep")
    _ref_args(p)
    p.add_argument("--out", required=True)
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
    return ITI.fit(model, tok, rows, config_from_args(ITIConfig, args, **overrides), batch_size=args.batch_size)


def _fit_report(iti: Any) -> dict[str, Any]:
    return {"fit": iti.fit_info_, "alpha": iti.alpha, "top_heads": [list(h) for h in iti.heads],
            "head_accuracies": iti.head_accuracies_.tolist(), "train_accuracies": iti.train_accuracies_.tolist()}


def _fit(args: argparse.Namespace) -> int:
    from intervene.intervenable import Intervenable
    from intervene.methods.iti.plots import plot_head_accuracies

    model, tok = load_model_args(args)
    iti = _fit_model(args, model, tok)
    out = Path(args.out)
    ivm = Intervenable(model, [iti], attach=False)
    ivm.metadata = {"method": "ITI (Li et al., 2023)", "dataset": args.dataset, "character": args.character}
    ivm.save_pretrained(out)
    plot_head_accuracies(iti.head_accuracies_, out / "head_accuracies.png", iti.heads)
    (out / "metrics.json").write_text(json.dumps(_fit_report(iti), indent=2) + "\n")
    best = ", ".join(f"L{lay}H{h}={a:.3f}" for (lay, h), a in zip(iti.heads[:5], iti.fit_info_["val_accuracy"]))
    print(f"ITI: {len(iti.heads)} heads (best {best}), alpha={iti.alpha:g}; wrote {out}")
    return 0


def _ref_texts(args: argparse.Namespace) -> list[str]:
    from intervene.evaluate.side_effects import load_reference_texts

    return load_reference_texts(args.ref_texts, args.n_ref)


def _mc_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from intervene.evaluate.mc import QA_PRIMER

    return {"primer": QA_PRIMER} if args.primer == "qa" else {}


def _eval(args: argparse.Namespace) -> int:
    from intervene.methods.iti.evaluate import evaluate_iti
    from intervene.methods.iti.intervention import ITI

    model, tok = load_model_args(args)
    iti = load_single(args.diff, model, ITI, "ITI interventions", args.alpha)
    rows = _rows(args.dataset, args.split, args.n, args.character, args.seed)
    kwargs = _mc_kwargs(args) if "question" in rows[0] else {}
    refs = _ref_texts(args)
    result = {"base": evaluate_iti(model, tok, None, rows, refs, args.batch_size, **kwargs),
              "iti": evaluate_iti(model, tok, iti, rows, refs, args.batch_size, **kwargs),
              "alpha": iti.alpha, "num_heads": len(iti.heads), "n_rows": len(rows)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from intervene.methods.iti.evaluate import sweep, truth_key, write_csv
    from intervene.methods.iti.plots import plot_head_accuracies, plot_tradeoff

    model, tok = load_model_args(args)
    ks = sorted(set(args.ks))
    iti = _fit_model(args, model, tok, max(ks))
    eval_spec = args.eval_dataset or args.dataset
    rows = _rows(eval_spec, "test", args.eval_n, args.eval_character or args.character, args.seed)
    kwargs = _mc_kwargs(args) if "question" in rows[0] else {}
    table = sweep(model, tok, iti, rows, _ref_texts(args), alphas=args.alphas, num_heads=ks,
                  batch_size=args.batch_size, **kwargs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(table, out / "sweep.csv")
    key = truth_key(table)
    plot_tradeoff(table, out / "tradeoff.png", key)
    plot_head_accuracies(iti.head_accuracies_, out / "head_accuracies.png", iti.heads)
    (out / "sweep.json").write_text(json.dumps({"rows": table, **_fit_report(iti)}, indent=2) + "\n")
    print(f"{'K':>4} {'alpha':>6} {key:>9} {'ce':>8} {'kl':>8}")
    for r in table:
        print(f"{r['num_heads']:>4} {r['alpha']:>6g} {r[key]:>9.4f} {r.get('ce', float('nan')):>8.4f} "
              f"{r.get('kl', float('nan')):>8.4f}")
    print(f"wrote {out / 'sweep.csv'}, {out / 'tradeoff.png'}, {out / 'head_accuracies.png'}")
    return 0
