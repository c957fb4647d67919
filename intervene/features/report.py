"""The explain → score pipeline over a latent cache, with its files on disk.

``out_dir`` receives::

    explanations/{latent}.json      explanation, raw answer, prompt, and the examples (explain + held-out)
    scores/{scorer}/{latent}.json   metrics and every sample with the model's answer
    summary.csv                     one row per latent: firing stats, explanation, each scorer's metrics
    scores_hist.png                 histogram of balanced accuracy per scorer

Scoring reads the held-out examples saved with each explanation, so the examples a scorer sees are
exactly the ones the explainer did not.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from intervene.features.clients import Client
from intervene.features.examples import sample_examples
from intervene.features.explain import Explainer, Explanation
from intervene.features.score import SCORERS, ScoreResult
from intervene.features.store import LatentCache

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "f1", "auroc", "n_failed")


def parse_latents(spec: str | Sequence[int] | None, n_latents: int) -> list[int]:
    """``"0-31"``, ``"1,5,9"``, ``"0-3,10"`` or a list; ``None`` means every latent."""
    if spec is None:
        return list(range(n_latents))
    if not isinstance(spec, str):
        return [int(i) for i in spec]
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out += list(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    bad = [i for i in out if not 0 <= i < n_latents]
    if bad:
        raise ValueError(f"latents {bad[:5]} are out of range [0, {n_latents})")
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def explain_latents(cache: LatentCache, latents: Sequence[int], client: Client, out_dir: str | Path,
                    tokenizer: Any = None, example_kwargs: Mapping[str, Any] | None = None,
                    explainer_kwargs: Mapping[str, Any] | None = None, skip_dead: bool = True) -> list[Explanation]:
    """Sample examples, explain each latent, write ``explanations/{latent}.json``; returns the explanations.

    ``skip_dead`` leaves out latents that never fire (no request is made for them).
    """
    tok = tokenizer or cache.tokenizer()
    if tok is None:
        raise ValueError("the cache holds no tokenizer: pass tokenizer=...")
    counts = cache.stats["count"]
    todo = [int(i) for i in latents if not skip_dead or int(counts[int(i)]) > 0]
    examples = [sample_examples(cache, i, **dict(example_kwargs or {})) for i in todo]
    expl = Explainer(client, tok, **dict(explainer_kwargs or {})).explain_many(examples)
    out = Path(out_dir)
    for e in expl:
        _write_json(out / "explanations" / f"{e.latent}.json", e.to_json())
    return expl


def load_explanations(out_dir: str | Path, latents: Sequence[int] | None = None) -> list[Explanation]:
    """Read ``explanations/*.json`` written by :func:`explain_latents` (sorted by latent)."""
    folder = Path(out_dir) / "explanations"
    files = sorted(folder.glob("*.json"), key=lambda p: int(p.stem))
    if latents is not None:
        want = {int(i) for i in latents}
        files = [f for f in files if int(f.stem) in want]
    return [Explanation.from_json(json.loads(f.read_text())) for f in files]


def score_latents(explanations: Sequence[Explanation], client: Client, out_dir: str | Path, tokenizer: Any,
                  scorers: Sequence[str] = ("detection", "fuzzing"), cache: LatentCache | None = None,
                  scorer_kwargs: Mapping[str, Any] | None = None) -> dict[str, list[ScoreResult]]:
    """Run each scorer on each explanation; writes per-latent JSON, ``summary.csv`` and ``scores_hist.png``."""
    out = Path(out_dir)
    results: dict[str, list[ScoreResult]] = {}
    for name in scorers:
        if name not in SCORERS:
            raise ValueError(f"unknown scorer {name!r}; have {sorted(SCORERS)}")
        scorer = SCORERS[name](client, tokenizer, **dict(scorer_kwargs or {}))
        results[name] = scorer.score_many([(e, e.examples) for e in explanations])
        for r in results[name]:
            _write_json(out / "scores" / name / f"{r.latent}.json", r.to_json())
    write_summary(out, explanations, results, cache)
    plot_score_hist(results, out / "scores_hist.png")
    return results


def write_summary(out: Path, explanations: Sequence[Explanation], results: Mapping[str, Sequence[ScoreResult]],
                  cache: LatentCache | None = None) -> Path:
    """``summary.csv``: latent, firing count / max (from the cache), explanation, ``{scorer}_{metric}``."""
    by = {name: {r.latent: r for r in rs} for name, rs in results.items()}
    stats = cache.stats if cache is not None else None
    cols = ["latent", "count", "max_act", "explanation"] + [f"{s}_{m}" for s in results for m in SUMMARY_METRICS]
    path = out / "summary.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for e in explanations:
            row: dict[str, Any] = {"latent": e.latent, "explanation": e.text}
            if stats is not None:
                row["count"] = int(stats["count"][e.latent])
                row["max_act"] = round(float(stats["max"][e.latent]), 6)
            for s in results:
                r = by[s].get(e.latent)
                for m in SUMMARY_METRICS:
                    v = None if r is None else r.metrics.get(m)
                    row[f"{s}_{m}"] = "" if v is None else (round(v, 6) if isinstance(v, float) else v)
            w.writerow(row)
    return path


def plot_score_hist(results: Mapping[str, Sequence[ScoreResult]], path: str | Path,
                    metric: str = "balanced_accuracy") -> Path:
    """Histogram of ``metric`` over latents, one series per scorer (Agg canvas; no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bins = [i / 20 for i in range(21)]
    for name, rs in results.items():
        vals = [float(r.metrics[metric]) for r in rs if r.metrics.get(metric) is not None]
        ax.hist(vals, bins=bins, alpha=0.6, label=f"{name} (n={len(vals)})")
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(metric.replace("_", " "))
    ax.set_ylabel("latents")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return path
