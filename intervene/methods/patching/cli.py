"""``intervene trace`` and ``intervene patch``: causal tracing and patching sweeps from the command line.

    intervene trace demo quirky:facts --n 40 --window 1 --out runs/trace
    intervene patch demo pairs.jsonl --sites layers.* layers.*.heads --method both --out runs/patch

``trace`` DATA: ``quirky:facts`` (the demo world's fact prompts: "Pel'elm works as a" -> " tailor") or a
JSON-lines file of ``{"prompt", "subject", "answer"?}``. It writes ``trace.csv`` (kind, token bucket,
layer, average indirect effect, 95% half-width), ``trace.png`` and one ``fact_<i>.png`` per plotted fact.
``patch`` PAIRS: a JSON-lines file of ``{"clean", "corrupted", "answer", "wrong"}`` (the metric is the
logit difference of the answer's and the wrong continuation's first tokens). It writes ``sweep.csv`` /
``sweep.png`` (and ``attribution.*`` with ``--method attribution|both``, plus their agreement).
Negative positions need the ``=`` form: ``--positions=-3,-2,-1``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from intervene.command import (
    add_config_arguments,
    add_model_arguments,
    add_progress_argument,
    config_from_args,
    guard,
    load_model_args,
)
from intervene.methods.patching.config import SweepConfig, TraceConfig


def _model_args(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_progress_argument(p)


def register(subparsers: Any) -> None:
    """Add ``trace`` and ``patch`` to the ``intervene`` command."""
    p = subparsers.add_parser("trace", help="causal tracing (ROME): where a model recalls facts",
                              description="Causal tracing: noise the subject, restore one clean state at a time, "
                                          "and measure how much of the answer's probability comes back.")
    _model_args(p)
    p.add_argument("data", help="quirky:facts, or a JSON-lines file of {prompt, subject, answer}")
    p.add_argument("--n", type=int, default=40, help="facts to trace (default 40)")
    p.add_argument("--plot-facts", type=int, default=2, help="also draw this many single-fact traces (default 2)")
    add_config_arguments(p, TraceConfig)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=guard(_trace))

    p = subparsers.add_parser("patch", help="activation / attribution patching sweep over clean/corrupted pairs",
                              description="Patch every (site, position) cell of clean/corrupted prompt pairs and "
                                          "measure how much of the clean answer's logit difference returns.")
    _model_args(p)
    p.add_argument("pairs", help="JSON-lines file of {clean, corrupted, answer, wrong}")
    p.add_argument("--n", type=int, default=None, help="use at most this many pairs")
    p.add_argument("--method", default="patching", choices=["patching", "attribution", "both"],
                   help="true patching, its attribution-patching estimate, or both with their agreement")
    add_config_arguments(p, SweepConfig)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=guard(_patch))


def _jsonl(path: str, keys: tuple[str, ...], n: int | None) -> list[dict[str, Any]]:
    rows = []
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    for i, line in enumerate(file.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {i + 1}: not JSON ({e})") from None
        missing = [k for k in keys if not isinstance(row.get(k), str)]
        if not isinstance(row, dict) or missing:
            raise ValueError(f"{path}, line {i + 1}: needs string fields {list(keys)} (missing {missing})")
        rows.append(row)
        if n is not None and len(rows) >= n:
            break
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def trace_items(spec: str, n: int) -> list[dict[str, str]]:
    """Fact items ``{prompt, subject, answer}`` of DATA."""
    if spec == "quirky:facts":
        from intervene.data.quirky import remedi_samples

        return [{"prompt": s["prompt"], "subject": s["entity"], "answer": s["target_true"]}
                for s in remedi_samples("test", n=n, seed=0)]
    if spec.startswith("quirky:"):
        raise ValueError(f"causal tracing needs facts: quirky:facts, not {spec}")
    rows = _jsonl(spec, ("prompt", "subject"), n)
    return [{k: r[k] for k in ("prompt", "subject", "answer") if k in r} for r in rows]


def _trace(args: argparse.Namespace) -> int:
    import csv

    from intervene.methods.patching.tracing import BUCKETS, trace_dataset

    model, tok = load_model_args(args)
    cfg = config_from_args(TraceConfig, args)
    items = trace_items(args.data, args.n)
    res = trace_dataset(model, tok, items, cfg, progress=not args.no_progress, keep=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "trace.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "bucket", "layer", "aie", "ci95"])
        for kind, a in res.aie.items():
            for b, bucket in enumerate(BUCKETS):
                for layer in range(a.shape[1]):
                    w.writerow([kind, bucket, layer, f"{float(a[b, layer]):.6g}", f"{float(res.ci[kind][b, layer]):.6g}"])
    res.plot(out / "trace.png")
    for i, t in enumerate(res.traces[: args.plot_facts]):
        t.plot(out / f"fact_{i}.png")
    peaks = "; ".join(f"{k}: {b} at layer {layer} ({v:+.3f})" for k in res.aie for b, layer, v in [res.peak(k)])
    print(f"traced {res.n} facts ({res.skipped} skipped: wrong answer), total effect {res.total_effect:.3f}. "
          f"Largest average indirect effects — {peaks}. Wrote {out / 'trace.csv'} and {out / 'trace.png'}.")
    return 0


def _patch(args: argparse.Namespace) -> int:
    from intervene.methods.patching.attribution import attribution_patching
    from intervene.methods.patching.metrics import logit_diff
    from intervene.methods.patching.sweeps import sweep

    model, tok = load_model_args(args)
    cfg = config_from_args(SweepConfig, args)
    rows = _jsonl(args.pairs, ("clean", "corrupted", "answer", "wrong"), args.n)
    first = [tok(r[k], add_special_tokens=False)["input_ids"] for r in rows for k in ("answer", "wrong")]
    if any(not ids for ids in first):
        raise ValueError("every answer and wrong continuation must tokenize to at least one token")
    metric = logit_diff([first[2 * i][0] for i in range(len(rows))], [first[2 * i + 1][0] for i in range(len(rows))])
    kw = dict(sites=list(cfg.sites), positions=cfg.position_spec(), tokenizer=tok, direction=cfg.direction,
              heads=cfg.heads, progress=not args.no_progress)
    clean, corrupted = [r["clean"] for r in rows], [r["corrupted"] for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    results = {}
    if args.method in ("patching", "both"):
        results["sweep"] = sweep(model, clean, corrupted, metric, batch_size=cfg.batch_size, **kw)
    if args.method in ("attribution", "both"):
        results["attribution"] = attribution_patching(model, clean, corrupted, metric,
                                                      batch_size=max(1, cfg.batch_size // 4), **kw)
    for name, res in results.items():
        res.to_csv(out / f"{name}.csv")
        res.plot(out / f"{name}.png")
        top = ", ".join(f"{r}@{p} {s:+.2f}" for r, p, s in res.top(3))
        lines.append(f"{res.method}: top cells {top}")
    if len(results) == 2:
        from intervene.methods.patching.compare import agreement

        agree = agreement(results["attribution"], results["sweep"])
        (out / "agreement.json").write_text(json.dumps(agree, indent=2) + "\n")
        lines.append(f"agreement: Spearman {agree['spearman']:.3f} over all {agree['cells']} cells, "
                     f"{agree['spearman_live']:.3f} over the {agree['live_cells']} non-zero ones")
    res0 = next(iter(results.values()))
    print(f"{len(rows)} pairs; metric clean {res0.clean:.3f}, corrupted {res0.corrupted:.3f}. " + "; ".join(lines)
          + f". Wrote {out}.")
    return 0
