"""Reading a latent cache written by :func:`intervene.features.cache.cache_latents` (layout described there)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from intervene.errors import LatentCacheError

FORMAT = "intervene-latent-cache"
VERSION = 1
INDEX = "index.json"
TOKENS = "tokens.safetensors"
STATS = "stats.safetensors"


@dataclass
class LatentActivations:
    """One latent's non-zero activations: ``positions`` ``[m]`` (flat token indices, ascending), ``values`` ``[m]``."""

    latent: int
    positions: torch.Tensor
    values: torch.Tensor


class LatentCache:
    """Read a cache written by :func:`cache_latents` (``index``, tokens, per-latent activations, stats)."""

    def __init__(self, path: str | Path, check_done: bool = True) -> None:
        self.path = Path(path)
        if not (self.path / INDEX).is_file():
            raise LatentCacheError(f"{self.path} is not a latent cache (no {INDEX})")
        self.index = json.loads((self.path / INDEX).read_text())
        if self.index.get("format") != FORMAT or self.index.get("version", 0) > VERSION:
            raise LatentCacheError(f"{self.path}: unknown cache format {self.index.get('format')!r} "
                                   f"v{self.index.get('version')}")
        if check_done and not self.index.get("done"):
            raise LatentCacheError(f"{self.path}: the cache is incomplete (resume it with cache_latents)")
        self._tokens: torch.Tensor | None = None
        self._stats: dict[str, torch.Tensor] | None = None

    @property
    def n_latents(self) -> int:
        return int(self.index["d_sae"])

    @property
    def ctx_len(self) -> int:
        return int(self.index["ctx_len"])

    @property
    def site(self) -> str:
        return str(self.index["site"])

    @property
    def tokens(self) -> torch.Tensor:
        """``[n_seq, ctx_len]`` int32 token ids (loaded once)."""
        if self._tokens is None:
            from safetensors.torch import load_file

            self._tokens = load_file(str(self.path / TOKENS))["tokens"]
        return self._tokens

    @property
    def n_tokens(self) -> int:
        return int(self.index["n_seq"]) * self.ctx_len

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """Per latent ``count`` (firings), ``max`` and ``mean`` (over firings) activation, ``[n_latents]`` each."""
        if self._stats is None:
            from safetensors.torch import load_file

            s = load_file(str(self.path / STATS))
            s["mean"] = (s["sum"] / s["count"].clamp_min(1)).float()
            s["max"] = torch.where(s["count"] > 0, s["max"], torch.zeros_like(s["max"]))
            self._stats = s
        return self._stats

    def tokenizer(self) -> Any:
        """The tokenizer saved with the cache (``None`` when none was given)."""
        if not (self.path / "tokenizer").is_dir():
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path / "tokenizer"))

    def _parts(self, shard: int) -> list[Path]:
        return sorted((self.path / "shards" / f"{shard:05d}").glob("*.safetensors"))

    def latent(self, latent: int) -> LatentActivations:
        """Every non-zero activation of ``latent`` across the corpus."""
        from safetensors import safe_open

        if not 0 <= int(latent) < self.n_latents:
            raise LatentCacheError(f"latent {latent} out of range [0, {self.n_latents})")
        width = int(self.index["shard_width"])
        shard, j = divmod(int(latent), width)
        pos, val = [], []
        for part in self._parts(shard):
            with safe_open(str(part), "pt") as f:
                a, b = f.get_slice("offsets")[j:j + 2].tolist()
                if b > a:
                    pos.append(f.get_slice("positions")[a:b])
                    val.append(f.get_slice("values")[a:b])
        if not pos:
            return LatentActivations(int(latent), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
        return LatentActivations(int(latent), torch.cat(pos), torch.cat(val))

    def _shard_entries(self, shard: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(first latent, latent ids, values)`` per part of ``shard`` (for whole-shard scans)."""
        from safetensors.torch import load_file

        width = int(self.index["shard_width"])
        for part in self._parts(shard):
            t = load_file(str(part))
            counts = t["offsets"].diff()
            lat = torch.repeat_interleave(torch.arange(counts.numel()), counts)
            yield shard * width, lat, t["values"]

    def dense(self, latents: Sequence[int] | None = None) -> torch.Tensor:
        """``[n_tokens, len(latents)]`` dense activations (for tests and small caches only)."""
        ids = list(range(self.n_latents)) if latents is None else [int(i) for i in latents]
        out = torch.zeros(self.n_tokens, len(ids))
        for c, i in enumerate(ids):
            rec = self.latent(i)
            out[rec.positions, c] = rec.values.float()
        return out

    def cooccurring(self, latent: int, top: int = 10) -> list[tuple[int, int]]:
        """The ``top`` latents firing most often on the same tokens as ``latent``: ``[(latent, count)]``.

        One latent's row of the co-occurrence matrix, computed by streaming the shards (the full
        ``n x n`` matrix is never built).
        """
        target = self.latent(latent).positions
        counts = torch.zeros(self.n_latents, dtype=torch.int64)
        if target.numel():
            from safetensors.torch import load_file

            width = int(self.index["shard_width"])
            for s in range(int(self.index["n_shards"])):
                for part in self._parts(s):
                    t = load_file(str(part))
                    idx = torch.searchsorted(target, t["positions"]).clamp_max(target.numel() - 1)
                    hit = target[idx] == t["positions"]
                    lat = torch.repeat_interleave(torch.arange(t["offsets"].numel() - 1), t["offsets"].diff())
                    counts += torch.bincount(lat[hit] + s * width, minlength=self.n_latents)
        counts[int(latent)] = 0
        k = min(top, int((counts > 0).sum()))
        vals, idx = counts.topk(k) if k else (counts[:0], counts[:0])
        return list(zip(idx.tolist(), vals.tolist()))
