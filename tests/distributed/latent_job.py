"""A latent-cache job of tests/test_distributed.py, alone or under ``torchrun``.

    python -m tests.distributed.latent_job CACHE OUT [--die-after K]

Caches the demo SAE's latents over 1,536 tokens of the demo's neutral text (batches of 4 rows of 32 tokens, a
small buffer so every block flushes several parts) and saves (rank 0) every latent's entries and the stats to OUT.
"""

from __future__ import annotations

import argparse
import os

import torch
from safetensors.torch import save_file

import intervene as iv
from intervene.activations.distributed import ranks
from intervene.data.neutral import neutral_corpus
from intervene.features.cache import cache_latents


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache")
    ap.add_argument("out")
    ap.add_argument("--die-after", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = iv.demo_model()
    sae = iv.load_sae("demo")
    group = ranks()
    import intervene.features.cache as cache_mod

    run, calls = cache_mod._run_model, [0]

    def counted(*a, **k):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if args.die_after and group.rank == group.world - 1 and calls[0] > args.die_after:
            os._exit(3)
        return run(*a, **k)

    cache_mod._run_model = counted
    cache = cache_latents(model, sae, neutral_corpus(60, seed=0), args.cache, tokenizer=tok, ctx_len=32,
                          batch_size=4, n_tokens=1536, buffer_size=600, progress=False)
    with open(f"{args.out}.forwards-{group.rank}", "w") as f:
        f.write(str(calls[0]))
    if group.main:
        out = {f"stats.{k}": v for k, v in cache.stats.items()}
        out["tokens"] = cache.tokens
        for i in range(cache.n_latents):
            rec = cache.latent(i)
            out[f"latent{i}.positions"], out[f"latent{i}.values"] = rec.positions, rec.values
        save_file(out, args.out)


if __name__ == "__main__":
    main()
