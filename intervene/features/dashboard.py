"""A static HTML dashboard of SAE latents: an index, and a page per latent with its contexts.

A latent is understood by looking at where it fires. ``write_dashboard(cache, out)`` writes::

    index.html              every latent shown: firing rate, activation, explanation and scores (when
                            ``explanations`` points at the output of `intervene features explain/score`),
                            the tokens its decoder direction promotes; sortable by any column
    latents/{i}.html        the strongest contexts, contexts sampled across the activation range
                            (quantiles), each token shaded by the latent's activation on it, and the
                            logit effects of the decoder direction (tokens promoted and suppressed)

Every file is self-contained (inline CSS and script, no fonts or libraries fetched): open
``index.html`` from disk. Contexts come from :func:`~intervene.features.examples.sample_examples`, the
windows the explainer sees.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from intervene.features.examples import Example, sample_examples
from intervene.features.store import LatentCache
from intervene.htmlpage import Raw, bars, cards, esc, page, shade, table, write_page

# Where the final norm sits in the families we know (its weight scales the residual before the unembedding).
_FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm",
                "model.decoder.final_layer_norm", "transformer.norm_f")


@dataclass
class LatentInfo:
    """What the pages show about one latent."""

    latent: int
    count: int
    rate: float
    max_act: float
    mean_act: float
    explanation: str | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)


def logit_effects(model: Any, tokenizer: Any, decoder: torch.Tensor, k: int = 10
                  ) -> list[tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
    """Per decoder row ``[n, d_model]``: the ``k`` tokens whose logits it raises most and lowers most.

    The direct path only: the row through the final norm's scale (when the model has one we know)
    and the unembedding, ignoring the layers in between, as SAE dashboards usually show it.
    """
    unembed = model.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
    d = decoder.detach().float()
    for name in _FINAL_NORMS:
        try:
            norm = model.get_submodule(name)
        except AttributeError:
            continue
        w = getattr(norm, "weight", None)
        if isinstance(w, torch.Tensor) and w.shape == (d.shape[1],):
            d = d * w.detach().float()
        break
    logits = d @ unembed.T  # [n, vocab]
    k = min(k, logits.shape[1])
    top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
    names = _token_names(tokenizer)
    return [([(names(i), float(v)) for v, i in zip(tv.tolist(), ti.tolist())],
             [(names(i), float(v)) for v, i in zip(bv.tolist(), bi.tolist())])
            for tv, ti, bv, bi in zip(top.values, top.indices, bottom.values, bottom.indices)]


def _token_names(tokenizer: Any) -> Any:
    """``id -> display string`` (memoised; keeps the leading space SentencePiece marks with ``▁``)."""
    memo: dict[int, str] = {}
    special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def name(i: int) -> str:
        if i not in memo:
            text = tokenizer.decode([i]) if i not in special else tokenizer.convert_ids_to_tokens(i)
            piece = tokenizer.convert_ids_to_tokens(i)
            if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
                text = " " + text
            memo[i] = text
        return memo[i]

    name.special = special  # type: ignore[attr-defined]
    return name


def _read_scores(folder: Path | None, latents: Sequence[int]) -> tuple[dict[int, str], dict[int, dict[str, Any]]]:
    """Explanations and balanced-accuracy scores written by `features explain` / `features score`."""
    expl: dict[int, str] = {}
    scores: dict[int, dict[str, Any]] = {}
    if folder is None:
        return expl, scores
    want = set(latents)
    for f in (folder / "explanations").glob("*.json"):
        if f.stem.isdigit() and int(f.stem) in want:
            expl[int(f.stem)] = json.loads(f.read_text()).get("explanation", "")
    for scorer_dir in sorted(p for p in (folder / "scores").glob("*") if p.is_dir()):
        for f in scorer_dir.glob("*.json"):
            if f.stem.isdigit() and int(f.stem) in want:
                metrics = json.loads(f.read_text()).get("metrics", {})
                scores.setdefault(int(f.stem), {})[scorer_dir.name] = metrics.get("balanced_accuracy")
    return expl, scores


def _context(ex: Example, names: Any, vmax: float) -> str:
    strings = [names(t) for t in ex.tokens]
    special = [t in names.special for t in ex.tokens]
    return (f'<div class="ctx"><span class="max">max {ex.max_act:.3g}</span>'
            f"{shade(strings, ex.acts, vmax, special)}</div>")


def _latent_page(info: LatentInfo, top: list[Example], spread: list[Example], names: Any, cache: LatentCache,
                 nav: list[tuple[str, str]]) -> str:
    head = [("fires on", f"{info.rate:.2%} of tokens"), ("times", info.count), ("max activation", f"{info.max_act:.3g}"),
            ("mean when firing", f"{info.mean_act:.3g}")]
    head += [(f"{k} score", "n/a" if v is None else f"{v:.2f}") for k, v in info.scores.items()]
    body = [f"<h1>Latent {info.latent}</h1>",
            f'<p class="muted">site {esc(cache.site)} &middot; {cache.n_tokens} tokens cached</p>', cards(head)]
    if info.explanation:
        body.append(f"<p><b>Explanation:</b> {esc(info.explanation)}</p>")
    if info.promoted:
        scale = max(abs(v) for _, v in info.promoted + info.suppressed) or 1.0
        body.append("<h2>Logit effects of the decoder direction</h2>"
                    '<p class="note">Direct path only: the decoder row through the final norm and the unembedding. '
                    "Tokens this latent makes more likely (left) and less likely (right).</p>"
                    f'<div class="logits"><div>{bars(info.promoted, scale)}</div>'
                    f"<div>{bars(info.suppressed, scale, negative=True)}</div></div>")
    vmax = info.max_act or 1.0
    body.append(f"<h2>Strongest contexts ({len(top)})</h2>"
                '<p class="note">Orange marks where the latent fires; the stronger, the darker (hover a token for '
                "its activation). Windows never overlap.</p>" + "".join(_context(e, names, vmax) for e in top))
    if spread:
        body.append("<h2>Across the activation range</h2>"
                    '<p class="note">Contexts sampled from each quantile of this latent\'s activations, strongest '
                    "quantile first: what it does when it fires weakly, not only at its peak.</p>")
        for q in sorted({e.quantile or 0 for e in spread}, reverse=True):
            group = [e for e in spread if (e.quantile or 0) == q]
            body.append(f'<h3 class="muted">quantile {q}</h3>' + "".join(_context(e, names, vmax) for e in group))
    if not top:
        body.append('<p class="note">This latent never fired on the cached tokens.</p>')
    return page(f"Latent {info.latent}", "\n".join(body), nav)


def write_dashboard(cache: LatentCache | str | Path, out_dir: str | Path, latents: Sequence[int] | None = None,
                    max_latents: int = 256, explanations: str | Path | None = None, model: Any = None,
                    sae: Any = None, n_top: int = 12, n_spread: int = 15, window: int = 24, n_logits: int = 10,
                    progress: bool = True) -> Path:
    """Write the dashboard (see the module docstring) and return the path of ``index.html``.

    Args:
        latents: the latents to show (default: the ``max_latents`` that fire most often).
        explanations: a folder written by `intervene features explain` (and `score`): adds their text and scores.
        model, sae: both given, the pages show the decoder direction's logit effects.
        n_top / n_spread: strongest contexts / contexts sampled over the activation quantiles, per latent.
    """
    from tqdm.auto import tqdm

    cache = cache if isinstance(cache, LatentCache) else LatentCache(cache)
    tok = cache.tokenizer()
    if tok is None:
        raise ValueError(f"{cache.path} holds no tokenizer, so its tokens cannot be shown")
    stats = cache.stats
    count = stats["count"]
    if latents is None:
        alive = int((count > 0).sum())
        latents = torch.argsort(count, descending=True, stable=True)[: min(max_latents, alive)].tolist()
    latents = [int(i) for i in latents]
    expl, scores = _read_scores(Path(explanations) if explanations else None, latents)
    effects = (logit_effects(model, tok, sae.W_dec[latents], n_logits) if model is not None and sae is not None
               else [([], [])] * len(latents))
    names = _token_names(tok)
    out = Path(out_dir)
    infos = []
    order = sorted(latents)
    for j, i in enumerate(tqdm(latents, desc="latent pages", unit="latent", disable=not progress)):
        info = LatentInfo(i, int(count[i]), float(count[i]) / max(1, cache.n_tokens), float(stats["max"][i]),
                          float(stats["mean"][i]), expl.get(i), scores.get(i, {}), *effects[j])
        ex = sample_examples(cache, i, window=min(window, cache.ctx_len), n_explain=n_top, n_score=n_spread,
                             n_nonactivating=0, hard=None, explain_from="top") if info.count else None
        k = order.index(i)
        nav = [("../index.html", "all latents")]
        nav += [(f"{order[k - 1]}.html", f"\u2190 latent {order[k - 1]}")] if k > 0 else []
        nav += [(f"{order[k + 1]}.html", f"latent {order[k + 1]} \u2192")] if k + 1 < len(order) else []
        write_page(out / "latents" / f"{i}.html",
                   _latent_page(info, ex.explain if ex else [], ex.score_activating if ex else [], names, cache, nav))
        infos.append(info)
    return write_page(out / "index.html", _index(cache, infos, sorted({s for v in scores.values() for s in v})))


def _index(cache: LatentCache, infos: list[LatentInfo], scorers: list[str]) -> str:
    count = cache.stats["count"]
    alive = int((count > 0).sum())
    src = cache.index.get("model", {}).get("name_or_path") or "?"
    head = cards([("tokens cached", cache.n_tokens), ("latents", cache.n_latents), ("fire at least once", alive),
                  ("mean active per token (L0)", f"{float(count.sum()) / max(1, cache.n_tokens):.2f}"),
                  ("shown here", len(infos))])
    headers = ["latent", "fires on (% tokens)", "times", "max act", "mean act"] + [f"{s} score" for s in scorers]
    headers += ["explanation", "promotes"]
    rows = []
    for info in sorted(infos, key=lambda x: -x.count):
        row: list[Any] = [Raw(f'<a href="latents/{info.latent}.html">{info.latent}</a>', info.latent),
                          Raw(f"{100 * info.rate:.2f}", info.rate), info.count, info.max_act, info.mean_act]
        row += [info.scores.get(s) for s in scorers]
        row += [info.explanation or "", " ".join(repr(t) for t, _ in info.promoted[:4])]
        rows.append(row)
    return page("SAE latents", "\n".join([
        "<h1>SAE latents</h1>",
        f'<p class="muted">model {esc(Path(src).name if "/" in src and Path(src).exists() else src)} &middot; '
        f"site {esc(cache.site)} &middot; cache {esc(cache.path.name)}</p>", head,
        '<p class="note">Click a latent for its contexts. Click a column header to sort. Scores are the balanced '
        "accuracy of the explanation's predictions (0.5 = chance), when explanations were scored.</p>",
        table(headers, rows, numeric=list(range(1, 5 + len(scorers))))]))
