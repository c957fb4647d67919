"""Our latent cache <-> EleutherAI delphi's cache layout, so each library's explainers and scorers run on the other's.

delphi (``latents/cache.py``, ``latents/loader.py``) writes, per hookpoint ``{module}``::

    {module}/config.json                 its CacheConfig (``cache_ctx_len``, ``n_tokens``, ``n_splits``, dataset
                                         names...) plus ``model_name``
    {module}/{start}_{end}.safetensors   latents start..end (both inclusive) of a split of
                                         ``linspace(0, width, n_splits + 1)``:
        "locations"   [m, 3]   (row, position, latent - start), uint16 when rows and latents fit, else uint32
        "activations" [m]      float16
        "tokens"      [n_seq, ctx_len]   the whole token array (in every split; without it delphi re-tokenizes
                                         its dataset from the Hub)

Its cache keeps activations with ``|a| > 1e-5``; :func:`export_delphi` applies the same threshold by default, so an
exported cache holds the entries delphi's own cache would. Values are float16 there, as delphi stores them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from intervene.errors import LatentCacheError
from intervene.features.store import FORMAT, INDEX, TOKENS, VERSION, LatentCache
from intervene.fileio import atomic_write_bytes
from intervene.safeio import Root
from intervene.schemas.base import validate
from intervene.schemas.caches import DelphiConfig
from intervene.tensorfile import check_tensor, load_tensors

__all__ = ["DELPHI_THRESHOLD", "export_delphi", "import_delphi", "read_delphi_entries", "split_bounds"]

DELPHI_THRESHOLD = 1e-5  # delphi's InMemoryCache.get_nonzeros keeps |activation| > 1e-5
_SPLIT = re.compile(r"^(\d+)_(\d+)\.safetensors$")


def _module_dir(root: Path, module: str) -> Path:
    # A module name is one path component: nothing is read or written outside the directory given.
    if not module or module in (".", "..") or "/" in module or "\\" in module or "\0" in module:
        raise LatentCacheError(f"invalid delphi module name {module!r}")
    return root / module


def split_bounds(width: int, n_splits: int) -> list[tuple[int, int]]:
    """delphi's splits of ``width`` latents: ``(start, end)`` pairs, ``end`` inclusive."""
    b = torch.linspace(0, width, steps=n_splits + 1).long().tolist()
    return [(b[i], b[i + 1] - 1) for i in range(n_splits) if b[i + 1] > b[i]]


def export_delphi(cache: LatentCache | str | Path, out_dir: str | Path, module: str | None = None,
                  n_splits: int = 5, threshold: float = DELPHI_THRESHOLD, model_name: str | None = None,
                  progress: bool = True) -> Path:
    """Write ``cache`` in delphi's layout under ``out_dir/{module}`` (default module: the cache's site).

    Args:
        threshold: keep activations with ``|a| > threshold`` (delphi's own rule; ``0`` keeps every entry).
        model_name: written to ``config.json`` (delphi loads the tokenizer from it unless given one).
    Returns:
        the module directory.
    """
    from safetensors.numpy import save as np_save
    from tqdm.auto import tqdm

    cache = cache if isinstance(cache, LatentCache) else LatentCache(cache)
    module = module or cache.site
    folder = _module_dir(Path(out_dir), module)
    folder.mkdir(parents=True, exist_ok=True)
    L, n_seq = cache.ctx_len, int(cache.index["n_seq"])
    tokens = cache.tokens.to(torch.int64).numpy()
    bounds = split_bounds(cache.n_latents, n_splits)
    for start, end in tqdm(bounds, desc="exporting to delphi", disable=not progress):
        locs, vals = [], []
        for latent in range(start, end + 1):
            rec = cache.latent(latent)
            keep = rec.values.float().abs() > threshold
            p = rec.positions[keep]
            locs.append(torch.stack([p // L, p % L, torch.full_like(p, latent - start)], dim=1))
            vals.append(rec.values[keep].float())
        loc = torch.cat(locs).numpy() if locs else np.zeros((0, 3), np.int64)
        small = loc.size == 0 or (loc.max(0) < 2 ** 16).all()  # delphi's rule, with positions checked too
        data = np_save({"locations": loc.astype(np.uint16 if small else np.uint32),
                        "activations": torch.cat(vals).half().numpy() if vals else np.zeros(0, np.float16),
                        "tokens": tokens})
        atomic_write_bytes(folder / f"{start}_{end}.safetensors", data)  # the user's umask, never half a file
    cfg = {"dataset_repo": "", "dataset_split": "", "dataset_name": "", "dataset_column": "text",
           "batch_size": int(cache.index.get("batch_size", 1)), "cache_ctx_len": L, "n_tokens": n_seq * L,
           "n_splits": len(bounds), "model_name": model_name or (cache.index.get("model") or {}).get("name_or_path"),
           "intervene": {"site": cache.site, "encoder": cache.index.get("encoder"), "threshold": threshold}}
    atomic_write_bytes(folder / "config.json", json.dumps(cfg, indent=4) + "\n")
    return folder


def read_delphi_entries(raw_dir: str | Path, module: str) -> dict[str, Any]:
    """Every entry of a delphi cache module: ``rows``, ``cols``, ``latents`` (int64 ``[m]``), ``values``
    (float32 ``[m]``), ``tokens`` ``[n_seq, ctx_len]``, ``width`` (one past the last split's end), ``config``.

    Read through :class:`~intervene.safeio.Root` (regular files inside ``raw_dir`` only) and checked:
    ``config.json`` against :class:`~intervene.schemas.caches.DelphiConfig`, each split's tensors (integer
    locations ``[m, 3]`` inside its latent range, finite float activations ``[m]``), disjoint splits, one
    token array shared by every split, and no entry twice.
    """
    root = Root(raw_dir, LatentCacheError)
    _module_dir(root.path, module)
    if root.kind(module) != "dir":
        raise LatentCacheError(f"{root.path / module}: no delphi cache module there", path=root.path / module)
    config: dict[str, Any] = {}
    if root.exists(f"{module}/config.json"):
        config = root.read_json(f"{module}/config.json")
        validate(DelphiConfig, config, LatentCacheError, root.path / module / "config.json")
    splits = sorted((int(m.group(1)), int(m.group(2)), name) for name in root.listdir(module)
                    if (m := _SPLIT.match(name)) and len(name) < 64)
    if not splits:
        raise LatentCacheError(f"{root.path / module}: no {{start}}_{{end}}.safetensors splits", path=root.path / module)
    n_splits = config.get("n_splits") if isinstance(config, dict) else None
    if n_splits is not None and n_splits != len(splits):
        raise LatentCacheError.at(root.path / module / "config.json", "n_splits", f"{len(splits)} (the split files "
                                  "present)", n_splits, note="a split file is missing or extra")
    rows, cols, lats, vals, tokens = [], [], [], [], None
    prev_end = -1
    for start, end, name in splits:
        where = root.path / module / name
        if start != prev_end + 1 or end < start or end >= 1 << 24:
            raise LatentCacheError.at(where, "name", f"the latent range starting at {prev_end + 1} (splits tile the "
                                      "latents from 0: one is missing or they overlap)", [start, end])
        prev_end = end
        t, _, _ = load_tensors(root, f"{module}/{name}")
        loc, act = t.get("locations"), t.get("activations")
        if loc is None or act is None or set(t) - {"locations", "activations", "tokens"}:
            raise LatentCacheError.at(where, "tensors", "locations, activations (and tokens)", sorted(t))
        if loc.ndim != 2 or loc.shape[1] != 3 or loc.dtype.is_floating_point or loc.dtype == torch.bool:
            raise LatentCacheError.at(where, "locations", "integer [m, 3]", f"{loc.dtype} {list(loc.shape)}")
        check_tensor(act, LatentCacheError, where, "activations", (loc.shape[0],))
        loc = loc.to(torch.int64)
        if loc.numel() and (int(loc.min()) < 0 or int(loc[:, 2].max()) > end - start):
            raise LatentCacheError(f"{where}: latent offsets outside {start}..{end}", path=where, field="locations")
        if "tokens" in t:
            tok = t["tokens"]
            if tok.ndim != 2 or tok.dtype.is_floating_point or tok.dtype == torch.bool or \
                    (tok.numel() and int(tok.min()) < 0):
                raise LatentCacheError.at(where, "tokens", "non-negative integer [n_seq, ctx_len]",
                                          f"{tok.dtype} {list(tok.shape)}")
            tok = tok.to(torch.int64)
            if tokens is None:
                tokens = tok
            elif not torch.equal(tokens, tok):
                raise LatentCacheError.at(where, "tokens", "the same token array as the other splits")
        rows.append(loc[:, 0])
        cols.append(loc[:, 1])
        lats.append(loc[:, 2] + start)
        vals.append(act.float())
    if tokens is None:
        raise LatentCacheError(f"{root.path / module}: the splits hold no [n_seq, ctx_len] tokens (delphi would "
                               "re-tokenize its dataset; re-cache with save_tokens=True)", path=root.path / module)
    out = {k: torch.cat(v) for k, v in (("rows", rows), ("cols", cols), ("latents", lats), ("values", vals))}
    if out["rows"].numel() and (int(out["rows"].max()) >= tokens.shape[0] or int(out["cols"].max()) >= tokens.shape[1]):
        raise LatentCacheError(f"{root.path / module}: locations outside the {tuple(tokens.shape)} token array",
                               path=root.path / module, field="locations")
    key = (out["latents"] * tokens.numel() + out["rows"] * tokens.shape[1] + out["cols"])
    if key.numel() != key.unique().numel():
        raise LatentCacheError(f"{root.path / module}: an entry (row, position, latent) appears twice",
                               path=root.path / module, field="locations")
    return {**out, "tokens": tokens, "width": splits[-1][1] + 1, "config": config}


def import_delphi(raw_dir: str | Path, module: str, out_dir: str | Path, *, d_sae: int | None = None,
                  n_shards: int = 8, tokenizer: Any = None, overwrite: bool = False) -> LatentCache:
    """Build one of our caches at ``out_dir`` from a delphi cache module (every entry, float16 values widened).

    ``d_sae`` defaults to one past delphi's last split (delphi does not record the width).
    """
    from intervene.features.cache import _Buffer, _flush, _remove
    from intervene.features.cache_files import save_recorded as _save
    from intervene.features.cache_files import write_json as _write_json

    e = read_delphi_entries(raw_dir, module)
    d_sae = int(d_sae or e["width"])
    if e["latents"].numel() and int(e["latents"].max()) >= d_sae:
        raise LatentCacheError(f"latent {int(e['latents'].max())} is out of range for d_sae={d_sae}")
    out = Path(out_dir)
    if (out / INDEX).exists() or (out / INDEX).is_symlink():
        if not overwrite:
            raise LatentCacheError(f"{out} already holds a latent cache; pass overwrite=True", path=out)
        for name in (INDEX, TOKENS, "stats.safetensors", "shards", "tokenizer"):
            _remove(out / name)
    tokens = e["tokens"].to(torch.int32)
    n_seq, L = tokens.shape
    width = math.ceil(d_sae / max(1, n_shards))
    cfg = e["config"]
    index = {"format": FORMAT, "version": VERSION, "site": (cfg.get("intervene") or {}).get("site") or module,
             "ctx_len": L, "n_seq": n_seq, "batch_size": n_seq, "buffer_size": 0,  # one "batch": the whole import
             "shard_width": width, "n_shards": math.ceil(d_sae / width), "d_sae": d_sae, "value_dtype": "float32",
             "encoder": {"kind": "delphi", "module": module}, "model": {"name_or_path": cfg.get("model_name")},
             "next_batch": 0, "n_parts": 0, "peak_buffer": 0, "done": False, "files": {}}
    out.mkdir(parents=True, exist_ok=True)
    _save(out / TOKENS, {"tokens": tokens}, index=index)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out / "tokenizer"))
    pos = e["rows"] * L + e["cols"]
    order = torch.argsort(pos, stable=True)  # positions ascending within each latent after the stable sort
    stats = {"count": torch.zeros(d_sae, dtype=torch.int64), "max": torch.full((d_sae,), -math.inf),
             "sum": torch.zeros(d_sae, dtype=torch.float64)}
    buf = _Buffer([pos[order]], [e["latents"][order].to(torch.int32)], [e["values"][order]], int(pos.numel()))
    _flush(out, buf, index, stats, next_batch=1)  # writes the shards, the stats and the index
    index["done"] = True
    _write_json(out / INDEX, index)
    return LatentCache(out)

