"""``intervene elicit | eval | sweep | plot``: elk-style probing runs from the command line.

    intervene elicit demo quirky:addition --net lr --character Alice --out runs/alice
    intervene eval runs/alice demo quirky:addition --character Bob
    intervene sweep --models demo --datasets quirky:addition quirky:comparison --add-pooled --net crc --out runs/sweep
    intervene plot runs/alice

MODEL: a local directory, a Hub id, or demo. DATASET: a local .jsonl/.json/.csv/.tsv file, a
Hugging Face dataset name (name or name:config), or quirky:<task>.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from intervene.command import MODEL_HELP, RAW, describe, guard

DATASET_HELP = "a local .jsonl/.json/.csv/.tsv file, a Hugging Face dataset (name or name:config), or quirky:TASK"
EXAMPLES, NOTE = __doc__.split("\n\n")[1:3]  # the usage lines and the MODEL / DATASET note above


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--net", default="lr", choices=["lr", "mean-diff", "lda", "ccs", "crc"], help="probe type")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layer indices (default: all)")
    p.add_argument("--max-examples", type=int, nargs="+", default=None, metavar="N",
                   help="rows for training [and for evaluation] (one number: both)")
    p.add_argument("--character", default=None, help="keep only this persona's rows (quirky: Alice or Bob)")
    p.add_argument("--labels", default="truth", choices=["truth", "character"],
                   help="train on the truth or on what the persona says")
    p.add_argument("--templates", default=None,
                   help="a built-in template set (true_false, yes_no, row) or a format string with {question}")
    p.add_argument("--positions", default="last", choices=["last", "mean"],
                   help="last token, or the mean over the answer's tokens")
    p.add_argument("--net-kwargs", default="{}", help='probe hyperparameters as JSON, e.g. \'{"C": 0.1}\'')
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default 16)")
    p.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for the AUROC interval")
    p.add_argument("--seed", type=int, default=0, help="seeds the train/test split and the bootstrap (default 0)")
    p.add_argument("--cache-dir", default=None, help="activation cache directory (resumable)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to load the model in (default float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, or auto (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _config(args: argparse.Namespace, model: str, dataset: str):
    from intervene.elicit import ElicitConfig

    mx = args.max_examples or [None]
    try:
        net_kwargs = json.loads(args.net_kwargs)
    except json.JSONDecodeError as e:
        raise ValueError(f"--net-kwargs is not valid JSON ({e}); write e.g. '{{\"C\": 0.1}}'") from None
    return ElicitConfig(model=model, dataset=dataset, net=args.net, layers=args.layers, max_train=mx[0],
                        max_test=mx[1] if len(mx) > 1 else mx[0], character=args.character, labels=args.labels,
                        templates=args.templates, positions=args.positions, batch_size=args.batch_size,
                        seed=args.seed, n_bootstrap=args.n_bootstrap, net_kwargs=net_kwargs,
                        cache_dir=args.cache_dir, dtype=args.dtype, device=args.device,
                        progress=not args.no_progress)


def _print_table(rows: list[dict], title: str) -> None:
    print(title)
    print(f"{'layer':>5}  {'auroc':>6}  {'95% CI':>15}  {'acc':>6}  {'cal_acc':>7}  {'ece':>6}")
    for r in rows:
        print(f"{r['layer']:>5}  {r['auroc']:6.3f}  [{r['auroc_lower']:.3f}, {r['auroc_upper']:.3f}]  "
              f"{r['acc']:6.3f}  {r['cal_acc']:7.3f}  {r['ece']:6.3f}")


@guard
def _elicit(args: argparse.Namespace) -> int:
    from intervene.data.loaders import dataset_slug
    from intervene.elicit import elicit, model_slug

    cfg = _config(args, args.model, args.dataset)
    out = Path(args.out) if args.out else Path("runs") / model_slug(args.model) / dataset_slug(args.dataset) / args.net
    result = elicit(cfg, out)
    _print_table(result.eval_rows, f"held-out metrics ({args.net} on {args.dataset}) -> {out}")
    return 0


@guard
def _eval(args: argparse.Namespace) -> int:
    from intervene.elicit import evaluate_run

    mx = args.max_examples[0] if args.max_examples else None
    rows, path = evaluate_run(args.run, args.model, args.dataset, character=args.character, against=args.against,
                              name=args.name, max_examples=mx, progress=not args.no_progress)
    _print_table(rows, f"transfer to {args.dataset}" + (f" ({args.character})" if args.character else "")
                 + f" against {args.against} -> {path}")
    return 0


@guard
def _sweep(args: argparse.Namespace) -> int:
    from intervene.elicit import sweep

    cfg = _config(args, args.models[0], args.datasets[0])
    summary = sweep(args.models, args.datasets, cfg, args.out, add_pooled=args.add_pooled)
    print(f"{'model':<24} {'dataset':<28} {'layer':>5} {'auroc':>6}")
    for r in summary:
        print(f"{str(r['model'])[-24:]:<24} {str(r['dataset'])[-28:]:<28} {r['best_layer']:>5} {r['auroc']:6.3f}")
    print(f"summary -> {Path(args.out) / 'summary.csv'}")
    return 0


@guard
def _plot(args: argparse.Namespace) -> int:
    from intervene.plots import plot_run

    path = plot_run(args.run, args.output)
    print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``elicit``, ``eval``, ``sweep`` and ``plot`` to the ``intervene`` command."""
    p = subparsers.add_parser("elicit", help="fit a probe per layer on a dataset and evaluate it (ELK-style)",
                              description=describe(
                                  "Fit a probe per layer on a dataset's activations and evaluate it on held-out "
                                  "rows (AUROC with a bootstrap interval, accuracy, calibration). Writes "
                                  "config.json, the probes and eval.csv to the run folder; `intervene plot RUN` "
                                  "draws them.", EXAMPLES, NOTE), formatter_class=RAW)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("dataset", help=DATASET_HELP)
    p.add_argument("--out", default=None, help="run folder (default: runs/<model>/<dataset>/<net>)")
    _common(p)
    p.set_defaults(func=_elicit)

    p = subparsers.add_parser("eval", help="evaluate a run's probes on another dataset or persona (transfer)",
                              description="Evaluate the probes of an elicit run on another dataset or persona "
                                          "(e.g. fitted on Alice, evaluated on Bob against the truth). Writes "
                                          "RUN/eval_<name>.csv; `intervene plot RUN` draws it beside the held-out "
                                          "curve.")
    p.add_argument("run", help="an elicit run folder (written by `intervene elicit`)")
    p.add_argument("model", help=f"{MODEL_HELP}; normally the run's own model")
    p.add_argument("dataset", help=DATASET_HELP)
    p.add_argument("--character", default=None, help="keep only this persona's rows (quirky: Alice or Bob)")
    p.add_argument("--against", default="truth", choices=["truth", "character"],
                   help="score the probes against the truth, or against what the persona says (default truth)")
    p.add_argument("--name", default=None, help="suffix of eval_<name>.csv (default: from the dataset)")
    p.add_argument("--max-examples", type=int, nargs=1, default=None, metavar="N", help="evaluate at most N rows")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_eval)

    p = subparsers.add_parser("sweep", help="elicit on every model x dataset (optionally pooled); summary CSV",
                              description="Run `intervene elicit` on every model x dataset pair (and, with "
                                          "--add-pooled, on all datasets pooled); writes one run folder each and "
                                          "OUT/summary.csv with each run's best layer.")
    p.add_argument("--models", nargs="+", required=True, metavar="MODEL", help=f"one or more: {MODEL_HELP}")
    p.add_argument("--datasets", nargs="+", required=True, metavar="DATASET", help=f"one or more: {DATASET_HELP}")
    p.add_argument("--add-pooled", action="store_true", help="also fit on all datasets pooled")
    p.add_argument("--out", required=True, help="output folder (one run folder per pair, summary.csv)")
    _common(p)
    p.set_defaults(func=_sweep)

    p = subparsers.add_parser("plot", help="plot AUROC by layer, with confidence intervals, for an elicit run",
                              description="Draw AUROC by layer with 95% intervals for an elicit run: the held-out "
                                          "curve (eval.csv) and every transfer evaluation (eval_<name>.csv) as a PNG.")
    p.add_argument("run", help="an elicit run folder (written by `intervene elicit`)")
    p.add_argument("--output", default=None, help="PNG path (default: RUN/auroc_by_layer.png)")
    p.set_defaults(func=_plot)
