"""``intervene features cache | explain | score | report``: SAE latents over a corpus, explained, scored, browsed.

    intervene features cache demo demo --tokens 20000 --out runs/latents
    intervene features report runs/latents --out runs/latents-html
    intervene features explain runs/latents --client local:demo --latents 0-31 --out runs/autointerp
    intervene features explain runs/latents --client openai:http://localhost:8000/v1 --client-model llama \\
        --latents 0-255 --out runs/autointerp
    intervene features score runs/latents --client openai:http://localhost:8000/v1 --client-model llama \\
        --out runs/autointerp
    intervene features report runs/latents --explanations runs/autointerp --out runs/latents-html

MODEL: a local directory, a Hub id, or demo. SAE: a folder, a Hub repo (sparsify or SAELens layout;
--hookpoint picks one SAE of many), or demo (the shipped SAE of the demo model). The corpus is
--corpus FILE (one text per line, or .jsonl rows with a text field), or for demo the demo model's
neutral and quirky text. score reads the explanations (and the held-out examples saved with them)
from --explanations (default: --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from intervene.command import (
    MODEL_HELP,
    RAW,
    add_command_group,
    add_progress_argument,
    describe,
    guard,
    progress_of,
)

EXAMPLES, NOTE = __doc__.split("\n\n")[1:3]
CACHE_HELP = "a latent cache directory written by `intervene features cache`"


def register(subparsers: Any) -> None:
    """Add ``features`` (``cache``, ``explain``, ``score``, ``report``) to the ``intervene`` command."""
    sub = add_command_group(subparsers, "features", help="SAE latents: cache activations, explain, score, and browse them as HTML",
                                description=describe(
                                    "SAE latents: record where each latent fires over a corpus (cache), browse "
                                    "them as static HTML pages (report), and explain and score them with a "
                                    "language model (explain, score).", EXAMPLES, NOTE), formatter_class=RAW)

    p = sub.add_parser("cache", help="record every non-zero latent activation over a corpus",
                       description=describe("Run MODEL over a corpus and record every non-zero activation of the "
                                            "SAE's latents (sparse, sharded, resumable), with the tokens and the "
                                            "tokenizer, so that later steps need neither the model nor the corpus.",
                                            NOTE), formatter_class=RAW)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("sae", help="SAE folder, Hub repo, or 'demo' (the shipped SAE of the demo model)")
    p.add_argument("--out", required=True, help="cache directory (resumed if it exists with the same settings)")
    p.add_argument("--tokens", type=int, default=20000, help="tokens to cache (default 20000)")
    p.add_argument("--corpus", default=None, help="text file / .jsonl (default for demo: the demo corpus)")
    p.add_argument("--site", default=None, help="override the SAE's site (e.g. layers.6)")
    p.add_argument("--hookpoint", default=None, help="subfolder of a multi-SAE folder or repo")
    p.add_argument("--revision", default=None, help="model revision (Hub)")
    p.add_argument("--sae-revision", default=None, help="SAE revision (Hub)")
    p.add_argument("--ctx-len", type=int, default=64, help="tokens per cached row (default 64)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default 16)")
    p.add_argument("--buffer-size", type=int, default=1 << 20, help="entries held in memory before a flush "
                                                                  "(default 1048576)")
    p.add_argument("--n-shards", type=int, default=8, help="files the latents are spread over (default 8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to load the model in (default float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, or auto (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache written with other settings")
    p.add_argument("--seed", type=int, default=0, help="demo corpus seed (default 0)")
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true", help="hide progress bars")
    p.set_defaults(func=guard(_cache))

    p = sub.add_parser("report", help="static HTML pages of the latents: contexts, logit effects, scores",
                       description=describe(
                           "Write a static HTML dashboard of a latent cache to OUT: index.html lists the latents "
                           "(firing rate, activations, explanation and scores when --explanations is given, the "
                           "tokens each promotes; sortable), and latents/<i>.html shows a latent's strongest "
                           "contexts and contexts sampled across its activation range, each token shaded by its "
                           "activation, and the logit effects of its decoder direction. Self-contained files: "
                           "open OUT/index.html in a browser, no server or network needed."), formatter_class=RAW)
    p.add_argument("cache", help=CACHE_HELP)
    p.add_argument("--out", required=True, help="output directory (index.html, latents/<i>.html)")
    p.add_argument("--explanations", default=None,
                   help="folder written by `features explain` / `features score`: show their explanations and scores")
    p.add_argument("--latents", default=None,
                   help="latents to show, e.g. 0-31 or 1,5,9 (default: the --max-latents that fire most often)")
    p.add_argument("--max-latents", type=int, default=256, help="latents shown by default (default 256)")
    p.add_argument("--model", default=None, help="model for the logit effects (default: the cache's own model, "
                                                 "when it is a local directory or demo)")
    p.add_argument("--sae", default=None, help="SAE for the logit effects (default: the cache's own SAE, when it "
                                               "is a local folder or demo)")
    p.add_argument("--no-logits", action="store_true", help="skip the logit effects (no model is loaded)")
    p.add_argument("--n-top", type=int, default=12, help="strongest contexts per latent (default 12)")
    p.add_argument("--n-spread", type=int, default=15,
                   help="contexts sampled across the activation quantiles per latent (default 15)")
    p.add_argument("--window", type=int, default=24, help="tokens per context (default 24)")
    add_progress_argument(p)
    p.set_defaults(func=guard(_report))

    p = sub.add_parser("explain", help="sample examples and explain latents with a language model",
                       description=describe(
                           "Explain latents: sample each latent's activating windows (and disjoint held-out and "
                           "non-activating ones for scoring), show them to a language model, and save its "
                           "one-line explanation to OUT/explanations/<latent>.json.", NOTE), formatter_class=RAW)
    p.add_argument("cache", help=CACHE_HELP)
    _client_args(p)
    p.add_argument("--out", required=True, help="output directory (explanations/{latent}.json)")
    p.add_argument("--latents", default="0-31", help="e.g. 0-31, 1,5,9 or all (default 0-31)")
    p.add_argument("--window", type=int, default=16, help="tokens per example (default 16)")
    p.add_argument("--n-explain", type=int, default=20, help="activating examples shown to the explainer (default 20)")
    p.add_argument("--n-score", type=int, default=20, help="held-out activating examples kept for scoring (default 20)")
    p.add_argument("--n-nonactivating", type=int, default=20,
                   help="non-activating examples kept for scoring (default 20)")
    p.add_argument("--hard", default="token", choices=["token", "similar", "none"],
                   help="hard negatives: windows around the tokens the latent fires on, windows similar to the "
                        "activating ones, or none (default token)")
    p.add_argument("--explain-from", default="top", choices=["top", "quantiles", "random"],
                   help="which activating windows the explainer sees (default top)")
    p.add_argument("--max-examples", type=int, default=20, help="examples shown in the prompt (default 20)")
    p.add_argument("--show-activations", action="store_true",
                   help="also list each marked token with its activation (0-10) in the prompt")
    p.add_argument("--threshold-frac", type=float, default=0.0,
                   help="highlight only tokens above this fraction of the examples' maximum activation")
    p.add_argument("--seed", type=int, default=0, help="seeds the example sampling (default 0)")
    p.set_defaults(func=guard(_explain))

    p = sub.add_parser("score", help="detection / fuzzing scores of saved explanations",
                       description=describe(
                           "Score saved explanations: a language model predicts from each explanation which "
                           "held-out windows activate the latent (detection) or which marked tokens do (fuzzing). "
                           "Writes OUT/scores/, summary.csv and scores_hist.png.", NOTE), formatter_class=RAW)
    p.add_argument("cache", help="the cache directory the explanations came from")
    _client_args(p)
    p.add_argument("--out", required=True, help="output directory (scores/, summary.csv, scores_hist.png)")
    p.add_argument("--explanations", default=None, help="directory holding explanations/ (default: --out)")
    p.add_argument("--latents", default=None, help="score only these latents (default: all explained)")
    p.add_argument("--scorers", default="detection,fuzzing",
                   help="comma-separated scorers: detection, fuzzing (default detection,fuzzing)")
    p.add_argument("--n-per-prompt", type=int, default=1, help="snippets per request (1 allows AUROC)")
    p.add_argument("--no-probs", action="store_true", help="parse generated answers, never ask for logprobs")
    p.add_argument("--seed", type=int, default=0, help="seeds the order of the snippets (default 0)")
    p.set_defaults(func=guard(_score))


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--client", required=True, help="local:MODEL (dir, Hub id, demo) or openai:URL")
    p.add_argument("--client-model", default=None, help="model name for openai: clients")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--max-workers", type=int, default=4, help="concurrent requests (openai:)")
    p.add_argument("--rps", type=float, default=None, help="requests per second limit (openai:)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="local: generation length")
    add_progress_argument(p)


def demo_corpus(n_tokens: int, seed: int = 0) -> list[str]:
    """Neutral text and quirky questions (about 2:1), shuffled: the demo model's own distribution."""
    import random

    from intervene.data.neutral import neutral_corpus
    from intervene.data.quirky import QUIRKY_TASKS, quirky_dataset

    n_lines = n_tokens // 8 + 32  # lines are 10-25 tokens: enough to fill n_tokens
    texts = neutral_corpus(2 * n_lines // 3, seed=seed)
    per_task = max(1, n_lines // (3 * 2 * len(QUIRKY_TASKS)) + 1)
    for task in QUIRKY_TASKS:
        texts += [r["text"] for r in quirky_dataset(task, "train", n=per_task, seed=seed, distinct=False)]
    random.Random(seed).shuffle(texts)
    return texts


def read_corpus(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no corpus file {path}")
    if p.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in p.read_text().splitlines() if line.strip()]
    return [line for line in p.read_text().splitlines() if line.strip()]


def _cache(args: argparse.Namespace) -> int:
    from intervene.assets import load_model
    from intervene.features import cache_latents, load_sae

    model, tok = load_model(args.model, args.dtype, args.device, progress=not args.quiet, revision=args.revision)
    sae = load_sae(args.sae, site=args.site, hookpoint=args.hookpoint, revision=args.sae_revision,
                   model=model, device=args.device)
    if args.corpus is None and args.model not in ("demo", "quirky-tiny"):
        raise ValueError("--corpus FILE is required for models other than demo")
    texts = demo_corpus(args.tokens, args.seed) if args.corpus in (None, "demo") else read_corpus(args.corpus)
    cache = cache_latents(model, sae, texts, args.out, tokenizer=tok, site=args.site, ctx_len=args.ctx_len,
                          batch_size=args.batch_size, n_tokens=args.tokens, buffer_size=args.buffer_size,
                          n_shards=args.n_shards, overwrite=args.overwrite, progress=not args.quiet)
    count = cache.stats["count"]
    alive = int((count > 0).sum())
    print(f"cached {cache.n_tokens} tokens x {cache.n_latents} latents at {cache.site}: {int(count.sum())} "
          f"activations, {alive} latents fire, mean L0 {float(count.sum()) / max(1, cache.n_tokens):.2f} -> {args.out}. "
          f"Next: intervene features report {args.out} --out {args.out.rstrip('/')}-html")
    return 0


def _report_sources(args: argparse.Namespace, cache: Any) -> tuple[Any, Any]:
    """Model and SAE for the logit effects: the options, else the cache's own when they are local."""
    if args.no_logits:
        return None, None
    from intervene.assets import DEMO_ALIASES, DEMO_MODEL_DIR

    model_name = args.model or cache.index.get("model", {}).get("name_or_path")
    sae_name = args.sae or cache.index.get("encoder_source")
    local = [n for n in (model_name, sae_name) if n and (n in DEMO_ALIASES or Path(n).is_dir()
                                                          or str(n) == str(DEMO_MODEL_DIR))]
    if not (args.model and args.sae) and len(local) < 2:
        print("no logit effects: the cache's model or SAE is not local; pass --model and --sae", file=sys.stderr)
        return None, None
    from intervene.assets import load_model
    from intervene.features import load_sae

    model, _ = load_model(model_name, progress=progress_of(args))
    return model, load_sae(sae_name, model=model)


def _report(args: argparse.Namespace) -> int:
    from intervene.features.dashboard import write_dashboard
    from intervene.features.report import parse_latents

    cache = _open_cache(args.cache)
    latents = None if args.latents is None else parse_latents(args.latents, cache.n_latents)
    model, sae = _report_sources(args, cache)
    index = write_dashboard(cache, args.out, latents=latents, max_latents=args.max_latents,
                            explanations=args.explanations, model=model, sae=sae, n_top=args.n_top,
                            n_spread=args.n_spread, window=args.window, progress=progress_of(args))
    n = len(list((Path(args.out) / "latents").glob("*.html")))
    print(f"wrote {n} latent pages and {index}: open it in a browser (self-contained files, no server needed)")
    return 0


def _client(args: argparse.Namespace) -> Any:
    from intervene.features import make_client

    if args.client.startswith("local:"):
        client = make_client(args.client, max_new_tokens=args.max_new_tokens)
    else:
        client = make_client(args.client, model=args.client_model, api_key=os.environ.get(args.api_key_env) or None,
                             max_workers=args.max_workers, requests_per_second=args.rps)
    return _with_progress(client, progress_of(args))


def _with_progress(client: Any, progress: bool, chunk: int = 16) -> Any:
    """``client`` with a progress bar over its requests: batches go to it ``chunk`` at a time (each chunk
    still concurrent for HTTP clients), and the bar advances between chunks."""
    from tqdm.auto import tqdm

    from intervene.features.clients import Client

    class WithProgress(Client):
        def generate(self, messages: Any, max_tokens: int = 256) -> str:
            return client.generate(messages, max_tokens)

        def choice_probs(self, messages: Any, choices: Any) -> Any:
            return client.choice_probs(messages, choices)

        def _chunked(self, batch: Any, call: Any, desc: str) -> list:
            out: list = []
            with tqdm(total=len(batch), desc=desc, unit="request", disable=not progress or not batch) as bar:
                for i in range(0, len(batch), chunk):
                    out += call(batch[i:i + chunk])
                    bar.update(len(batch[i:i + chunk]))
            return out

        def generate_many(self, batch: Any, max_tokens: int = 256) -> list:
            return self._chunked(list(batch), lambda b: client.generate_many(b, max_tokens), "generating")

        def choice_probs_many(self, batch: Any, choices: Any) -> list:
            return self._chunked(list(batch), lambda b: client.choice_probs_many(b, choices), "scoring")

        @property
        def errors(self) -> list[str]:
            return client.errors

    return WithProgress()


def _open_cache(path: str) -> Any:
    from intervene.features import LatentCache

    if not Path(path).is_dir():
        raise FileNotFoundError(f"no such cache directory: {path} (write one with `intervene features cache "
                                "MODEL SAE --out DIR`)")
    return LatentCache(path)


def _explain(args: argparse.Namespace) -> int:
    from intervene.features import explain_latents
    from intervene.features.report import parse_latents

    cache = _open_cache(args.cache)
    latents = parse_latents(None if args.latents == "all" else args.latents, cache.n_latents)
    ex_kw = dict(window=args.window, n_explain=args.n_explain, n_score=args.n_score,
                 n_nonactivating=args.n_nonactivating, hard=None if args.hard == "none" else args.hard,
                 explain_from=args.explain_from, seed=args.seed)
    client = _client(args)
    expl = explain_latents(cache, latents, client, args.out, example_kwargs=ex_kw,
                           explainer_kwargs=dict(max_examples=args.max_examples, show_activations=args.show_activations,
                                                 threshold_frac=args.threshold_frac))
    for e in expl:
        print(f"latent {e.latent:>6}: {e.text}")
    skipped = len(latents) - len(expl)
    print(f"Next: intervene features score {args.cache} --client {args.client} --out {args.out}; then "
          f"intervene features report {args.cache} --explanations {args.out} --out {args.out}-html")
    print(f"{len(expl)} explanations -> {Path(args.out) / 'explanations'}" + (f" ({skipped} dead latents skipped)"
                                                                           if skipped else ""))
    if client.errors:
        print(f"{len(client.errors)} failed requests; first: {client.errors[0]}", file=sys.stderr)
    return 0


def _score(args: argparse.Namespace) -> int:
    from intervene.features import load_explanations, score_latents
    from intervene.features.report import parse_latents

    cache = _open_cache(args.cache)
    tok = cache.tokenizer()
    if tok is None:
        raise ValueError(f"{args.cache} holds no tokenizer")
    latents = None if args.latents is None else parse_latents(args.latents, cache.n_latents)
    expl = load_explanations(args.explanations or args.out, latents)
    if not expl:
        raise ValueError(f"no explanations under {Path(args.explanations or args.out) / 'explanations'}")
    client = _client(args)
    scorers = [s.strip() for s in args.scorers.split(",") if s.strip()]
    results = score_latents(expl, client, args.out, tok, scorers=scorers, cache=cache,
                            scorer_kwargs=dict(n_per_prompt=args.n_per_prompt, use_probs=not args.no_probs,
                                               seed=args.seed))
    for name, rs in results.items():
        vals = [r.metrics["balanced_accuracy"] for r in rs if r.metrics["balanced_accuracy"] is not None]
        mean = sum(vals) / len(vals) if vals else float("nan")
        print(f"{name}: mean balanced accuracy {mean:.3f} over {len(vals)} latents")
    print(f"-> {Path(args.out) / 'summary.csv'}, {Path(args.out) / 'scores_hist.png'}. To browse them: "
          f"intervene features report {args.cache} --explanations {args.explanations or args.out} --out DIR")
    if client.errors:
        print(f"{len(client.errors)} failed requests; first: {client.errors[0]}", file=sys.stderr)
    return 0
