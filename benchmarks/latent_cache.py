"""Latent-cache benchmark: throughput against a plain forward + SAE encoder, and peak memory vs corpus size.

    python benchmarks/latent_cache.py                 # ~1-2 minutes on 2 CPU cores
    python benchmarks/latent_cache.py --sizes 50000 200000 800000 --d-sae 8192

Throughput: tokens/s of ``cache_latents`` (sparse records, sharded writes, index) against
(a) the same work without the cache: a forward stopped after the SAE's site, as the cache stops it, and the
    SAE encoder applied there (``encode_sparse``), on the same threads; and
(b) for reference, a full forward + encoder (more work than the cache does: every layer after the site).
Target: cache >= 0.9x (a), the fair baseline; the ratio to (b) flatters the cache and is not the headline.

Memory: one fresh subprocess per corpus size caches it with a fixed buffer and reports its own peak RSS, read
in the child from ``/proc/self/status`` (``VmHWM``, the high-water mark of the child's own address space).
``getrusage(RUSAGE_SELF).ru_maxrss`` is not used: a process started by ``fork``/``vfork`` + ``exec`` carries
the parent's peak over into it, so every size would report at least the parent's peak. A bounded cache keeps
the peak flat as the corpus grows.

Model: the shipped demo model and SAE when present, else a random Llama of the same shape with a
random top-k SAE. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def build(d_sae: int, k: int, model_name: str = "demo", sae_name: str = "demo", seed: int = 0):
    """(model, sae, description): the given (default: shipped demo) pair when ``d_sae`` is 0 and they load,
    else a random Llama of the demo's shape with a random top-k SAE at ``layers.1``."""
    from intervene.features import SAE, load_sae

    if d_sae == 0:
        try:
            from transformers import AutoModelForCausalLM

            from intervene.assets import resolve_model_name

            model = AutoModelForCausalLM.from_pretrained(resolve_model_name(model_name)).eval()
            return model, load_sae(sae_name, model=model), f"model {model_name} + SAE {sae_name}"
        except Exception:  # not shipped yet: fall through to random weights of the same shape
            d_sae = 2048
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(128, d_sae, generator=g) / 128 ** 0.5
    sae = SAE(W, torch.zeros(d_sae), W.T.contiguous(), torch.zeros(128), activation="topk", k=k, site="layers.1")
    return model, sae, f"random Llama (demo shape) + random top-{k} SAE, d_sae={d_sae}"


def random_rows(n_tokens: int, ctx_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n_tokens // ctx_len, ctx_len), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def baseline(model, sae, rows: torch.Tensor, batch_size: int, stop_early: bool) -> float:
    """Seconds for forward + encode_sparse over ``rows`` (results discarded, nothing stored)."""
    from intervene.hooks import HookSet, add_output_hook
    from intervene.sites import resolve_site

    class Stop(Exception):
        pass

    site = resolve_site(model, sae.site)
    got = {}

    def grab(h):
        got["h"] = h
        if stop_early:
            raise Stop
        return h

    hooks = HookSet()
    add_output_hook(hooks, site.module, grab, sae.site)
    t0 = time.perf_counter()
    try:
        for i in range(0, rows.shape[0], batch_size):
            ids = rows[i:i + batch_size]
            try:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except Stop:
                pass
            sae.encode_sparse(got.pop("h").reshape(ids.numel(), -1))
    finally:
        hooks.remove()
    return time.perf_counter() - t0


def peak_rss_mb() -> float:
    """This process's own peak resident set size in MiB: ``VmHWM`` of /proc/self/status (Linux), which an
    ``exec`` resets with the address space; elsewhere ``ru_maxrss`` (which may include the parent's peak)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS: bytes; elsewhere KiB


def child(args: argparse.Namespace) -> None:
    """Cache ``args.child`` tokens in this fresh process; print JSON with seconds and peak RSS."""
    from intervene.features import cache_latents

    torch.set_num_threads(args.threads)
    model, sae, _ = build(args.d_sae, args.k, args.model, args.sae)
    rows = random_rows(args.child, args.ctx_len, model.config.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = cache_latents(model, sae, rows, tmp, batch_size=args.batch_size, buffer_size=args.buffer_size,
                              progress=False)
        secs = time.perf_counter() - t0
        entries = int(cache.stats["count"].sum())
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    rss_mb = peak_rss_mb()
    print(json.dumps({"tokens": int(rows.numel()), "seconds": secs, "peak_rss_mb": rss_mb, "entries": entries,
                      "disk_mb": size / 2**20, "peak_buffer": cache.index["peak_buffer"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768, help="tokens for the throughput comparison")
    p.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536, 262144], help="corpus sizes for RSS")
    p.add_argument("--model", default="demo", help="model dir / Hub id / demo")
    p.add_argument("--sae", default="demo", help="SAE folder / Hub repo / demo")
    p.add_argument("--d-sae", type=int, default=0, help="0: --model/--sae (else a random top-k SAE this wide)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--ctx-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--buffer-size", type=int, default=1 << 18)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        return child(args)
    from intervene.features import cache_latents

    torch.set_num_threads(args.threads)
    model, sae, what = build(args.d_sae, args.k, args.model, args.sae)
    rows = random_rows(args.tokens, args.ctx_len, model.config.vocab_size)
    n = rows.numel()
    print(f"{what}; site {sae.site}; {n} tokens in rows of {args.ctx_len}; batch {args.batch_size}; "
          f"torch threads {args.threads}")
    baseline(model, sae, rows[: args.batch_size * 2], args.batch_size, False)  # warm-up
    best = {"full": float("inf"), "early": float("inf"), "cache": float("inf")}
    for _ in range(args.repeats):
        best["full"] = min(best["full"], baseline(model, sae, rows, args.batch_size, stop_early=False))
        best["early"] = min(best["early"], baseline(model, sae, rows, args.batch_size, stop_early=True))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            cache_latents(model, sae, rows, tmp, batch_size=args.batch_size, buffer_size=args.buffer_size,
                          progress=False)
            best["cache"] = min(best["cache"], time.perf_counter() - t0)
    tps = {k: n / v for k, v in best.items()}
    print(f"  (a) forward stopped at the site + encoder (the same work, no cache) {tps['early']:>10,.0f} tokens/s")
    print(f"  (b) full forward + encoder (reference: more work)                  {tps['full']:>10,.0f} tokens/s")
    print(f"  cache_latents                                                      {tps['cache']:>10,.0f} tokens/s")
    ratio = tps["cache"] / tps["early"]
    print(f"headline: cache_latents = {ratio:.2f}x the same work without the cache (target >= 0.9x: "
          f"{'met' if ratio >= 0.9 else 'NOT met'}; {tps['cache'] / tps['full']:.2f}x a full forward; "
          f"best of {args.repeats}, {args.threads} thread(s) each)")
    print(f"peak RSS per corpus size (fresh process each, its own VmHWM, buffer {args.buffer_size} entries):")
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(size), "--model", args.model, "--sae", args.sae,
               "--d-sae", str(args.d_sae), "--k", str(args.k),
               "--ctx-len", str(args.ctx_len), "--batch-size", str(args.batch_size),
               "--buffer-size", str(args.buffer_size), "--threads", str(args.threads)]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"  {res['tokens']:>9,} tokens: peak RSS {res['peak_rss_mb']:7.1f} MB, {res['tokens'] / res['seconds']:>9,.0f} "
              f"tokens/s, {res['entries']:>10,} entries, {res['disk_mb']:6.1f} MB on disk, peak buffer {res['peak_buffer']:,}")


if __name__ == "__main__":
    main()
