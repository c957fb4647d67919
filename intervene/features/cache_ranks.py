"""A latent cache written by several ranks (``torchrun``): each rank caches a contiguous block of the batches,
then rank 0 links the blocks' parts into one cache in batch order and computes the statistics.

The statistics are computed from the finished cache, latent by latent over its entries in position order —
in a single-process run too — so their float sums never depend on where a run was split or flushed: one
process and several give the same bits.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from intervene.activations.cache import rank_dir
from intervene.errors import LatentCacheError
from intervene.features.cache_files import progress_note, save_recorded, write_json
from intervene.features.store import (
    FORMAT,
    INDEX,
    STATS,
    TOKENS,
    VERSION,
    LatentCache,
    part_name,
    read_latent_index,
)
from intervene.fileio import atomic_write_bytes, dir_lock
from intervene.safeio import Root

_PART = re.compile(r"^shards/([0-9]{5})/([0-9]{6})\.safetensors$")


def final_stats(out: Path, index: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``count`` / ``max`` / ``sum`` per latent ``[d_sae]`` from the parts ``index`` records, entries of each latent
    taken in position order (``bincount`` adds each bin's weights in input order)."""
    d_sae = int(index["d_sae"])
    stats = {"count": torch.zeros(d_sae, dtype=torch.int64), "max": torch.full((d_sae,), -math.inf),
             "sum": torch.zeros(d_sae, dtype=torch.float64)}
    cache = LatentCache(out, check_done=False)
    cache.index = index  # the parts written so far, before the index on disk says so
    cache._files = index.get("files")
    for s in range(int(index["n_shards"])):
        lats, vals = [], []
        for lo, lat, val in cache._shard_entries(s):
            lats.append(lat + lo)
            vals.append(val)
        if not lats:
            continue
        lat, val = torch.cat(lats), torch.cat(vals)
        stats["count"] += torch.bincount(lat, minlength=d_sae)
        stats["sum"] += torch.bincount(lat, weights=val.double(), minlength=d_sae)
        stats["max"] = torch.maximum(stats["max"],
                                     torch.full((d_sae,), -math.inf).scatter_reduce(0, lat, val.float(), "amax"))
    return stats


def merge_rank_caches(out: Path, world: int, settings: dict[str, Any], tokens: torch.Tensor, tokenizer: Any) -> None:
    """Rank 0, after every rank finished its block: one cache in ``out``, as a single process writes it.

    Parts keep their bytes (hard links, or copies where links are not supported) and their recorded sha256;
    they are renumbered so rank 0's come first, and parts no shard wrote (empty flushes) are dropped.
    """
    n_batches = math.ceil(int(settings["n_seq"]) / int(settings["batch_size"]))
    out.mkdir(parents=True, exist_ok=True)
    with dir_lock(out, exclusive=True):
        index: dict[str, Any] = {"format": FORMAT, "version": VERSION, **settings, "next_batch": n_batches,
                                 "n_parts": 0, "peak_buffer": 0, "done": False, "files": {}}
        for rank in range(world):
            sub = rank_dir(out, rank, world)
            sub_index = read_latent_index(Root(sub, LatentCacheError))
            if not sub_index.get("done"):
                raise LatentCacheError(f"{sub} is incomplete: rank {rank} did not finish its block",
                                       path=sub / INDEX, field="done")
            parts = sorted({int(m.group(2)) for name in sub_index["files"] if (m := _PART.match(name))})
            renumber = {p: index["n_parts"] + i for i, p in enumerate(parts)}
            for name, record in sub_index["files"].items():
                m = _PART.match(name)
                if m is None:
                    continue
                new = part_name(int(m.group(1)), renumber[int(m.group(2))])
                target = out / new
                target.parent.mkdir(parents=True, exist_ok=True)
                if os.path.lexists(target):
                    target.unlink()
                try:
                    os.link(sub / name, target)
                except OSError:  # a file system without hard links
                    shutil.copyfile(sub / name, target)
                index["files"][new] = dict(record)
            index["n_parts"] += len(parts)
            index["peak_buffer"] = max(index["peak_buffer"], int(sub_index.get("peak_buffer", 0)))
        save_recorded(out / TOKENS, {"tokens": tokens}, index=index)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(out / "tokenizer"))
        write_json(out / INDEX, index)  # parts recorded; not done until the stats are written
        save_recorded(out / STATS, final_stats(out, index), metadata={"progress": progress_note(index["n_parts"], n_batches)},
              index=index)
        index["done"] = True
        atomic_write_bytes(out / INDEX, json.dumps(index, indent=1, allow_nan=False) + "\n")
