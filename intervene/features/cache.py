"""The latent cache: every non-zero latent activation over a token corpus, sparse, sharded, resumable.

Layout of a cache directory::

    index.json                      settings, progress (completed batches, parts written), the encoder
    tokens.safetensors              "tokens" [n_seq, ctx_len] int32 -- stored once, never per shard
    stats.safetensors               per latent: "count" (int64), "max", "sum" (float32/64)
    shards/{s:05d}/{p:06d}.safetensors
        "positions" [m] int64       flat token index (row * ctx_len + column), ascending per latent
        "values"    [m]             the activations
        "offsets"   [width + 1]     CSR: latent (s*width + j) owns entries offsets[j]:offsets[j+1]
    tokenizer/                      the tokenizer (when given), so the cache decodes on its own

Memory is bounded: activations go into a buffer of at most ``buffer_size`` entries (or one batch,
if a single batch holds more) that is flushed as one *part* per latent shard. A flush writes the
parts, then the stats, then the index, each atomically (temp file + rename); the index records the
batches whose entries are on disk, so an interrupted run resumes at the first unflushed batch and,
because flushes fall on the same batches, writes byte-identical files. Reading a latent touches
only its shard's parts, through ``offsets``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from intervene.activations.cache import rank_dir
from intervene.activations.distributed import barrier, ranks
from intervene.features.cache_files import progress_note, save_recorded, write_json
from intervene.features.cache_ranks import final_stats, merge_rank_caches
from intervene.features.encoders import LatentEncoder
from intervene.features.store import (
    FORMAT,
    INDEX,
    STATS,
    TOKENS,
    VERSION,
    LatentCache,
    LatentCacheError,
    read_latent_index,
)
from intervene.fileio import dir_lock, sweep_temporaries
from intervene.safeio import Root

__all__ = ["LatentCache", "LatentCacheError", "cache_latents", "token_rows"]


# ---- inputs ----------------------------------------------------------------------------------
def token_rows(corpus: Sequence[str] | Sequence[torch.Tensor] | torch.Tensor, tokenizer: Any = None,
               ctx_len: int = 64, n_tokens: int | None = None) -> torch.Tensor:
    """Pack a corpus into ``[n_seq, ctx_len]`` token ids (int32).

    Texts are tokenized one by one (with the tokenizer's special tokens, e.g. BOS), concatenated
    and cut into rows; the incomplete last row is dropped. A 2-D tensor is taken as rows already.
    ``n_tokens`` caps the total (rounded down to whole rows, at least one row).
    """
    if isinstance(corpus, torch.Tensor) and corpus.ndim == 2:
        rows = corpus
    else:
        from array import array

        stream = array("q")  # 8 bytes a token, not a Python int object each
        cap = None if n_tokens is None else max(int(n_tokens), ctx_len)
        for item in corpus:
            if isinstance(item, str):
                if tokenizer is None:
                    raise LatentCacheError("texts need a tokenizer (pass tokenizer=...)")
                stream.extend(tokenizer(item)["input_ids"])
            else:
                stream.extend(torch.as_tensor(item).reshape(-1).tolist())
            if cap is not None and len(stream) >= cap:
                break
        n = len(stream) // ctx_len
        if n == 0:
            raise LatentCacheError(f"the corpus has {len(stream)} tokens, fewer than one row of ctx_len={ctx_len}")
        rows = torch.frombuffer(stream, dtype=torch.int64)[: n * ctx_len].view(n, ctx_len).clone()
    if n_tokens is not None:
        rows = rows[: max(1, int(n_tokens) // rows.shape[1])]
    return rows.to(torch.int32).contiguous()


# ---- small helpers ---------------------------------------------------------------------------



def _digest_tensors(tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 65536)]
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(sample.to("cpu", torch.float64 if t.is_floating_point() else torch.int64).numpy().tobytes())
    return h.hexdigest()[:24]


def _model_id(model: nn.Module) -> dict[str, Any]:
    try:
        from intervene.activations.extract import weight_digest

        digest = weight_digest(model)[:24]
    except Exception:  # the digest is only a guard against mixing models in one cache
        digest = _digest_tensors([p for _, p in list(model.named_parameters())[:4]])
    cfg = getattr(model, "config", None)
    return {"name_or_path": getattr(cfg, "_name_or_path", None) or None, "digest": digest}


class _StopForward(Exception):
    """Raised by the capture hook once the site ran: the rest of the model is skipped."""


def _run_model(model: nn.Module, input_ids: torch.Tensor) -> None:
    """One forward; module-level so tests can interrupt a run between batches."""
    try:
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
    except _StopForward:
        pass


def _encoder_device(encoder: Any) -> torch.device:
    for t in list(getattr(encoder, "buffers", lambda: [])()) + list(getattr(encoder, "parameters", lambda: [])()):
        return t.device
    return torch.device("cpu")


# ---- writing ---------------------------------------------------------------------------------
@dataclass
class _Buffer:
    positions: list[torch.Tensor]
    latents: list[torch.Tensor]
    values: list[torch.Tensor]
    size: int = 0

    def add(self, p: torch.Tensor, lat: torch.Tensor, v: torch.Tensor) -> None:
        self.positions.append(p)
        self.latents.append(lat)
        self.values.append(v)
        self.size += int(p.numel())


@torch.no_grad()
def cache_latents(model: nn.Module, encoder: LatentEncoder, corpus: Sequence[str] | Sequence[torch.Tensor] | torch.Tensor,
                  out_dir: str | Path, *, tokenizer: Any = None, site: str | None = None, ctx_len: int = 64,
                  batch_size: int = 16, n_tokens: int | None = None, buffer_size: int = 1 << 20,
                  shard_width: int | None = None, n_shards: int = 8, value_dtype: torch.dtype = torch.float32,
                  resume: bool = True, overwrite: bool = False, progress: bool = True) -> LatentCache:
    """Run ``model`` over ``corpus`` and record every non-zero latent of ``encoder`` at its site.

    Args:
        encoder: an :class:`~intervene.features.sae.SAE` or :class:`~intervene.features.encoders.DirectionEncoder`.
        corpus: texts (with ``tokenizer``), token-id tensors, or a ``[n_seq, ctx_len]`` tensor (see :func:`token_rows`).
        site: overrides ``encoder.site``.
        buffer_size: entries held in memory before a flush (16 bytes each with float32 values; a flush
            briefly needs about twice that while it sorts).
        shard_width: latents per shard (default: ``ceil(d_sae / n_shards)``).
        resume: continue an interrupted cache with the same settings (else ``LatentCacheError``);
            ``overwrite`` deletes a cache with other settings instead.

    Returns:
        the finished :class:`LatentCache`.
    """
    out = Path(out_dir)
    site = site or getattr(encoder, "site", None)
    if site is None:
        raise LatentCacheError("the encoder has no site: pass site=... (e.g. 'layers.6')")
    tokens = token_rows(corpus, tokenizer, ctx_len, n_tokens)
    n_seq, ctx_len = tokens.shape
    d_sae = int(encoder.d_sae)
    width = int(shard_width or math.ceil(d_sae / max(1, n_shards)))
    settings = {"site": site, "ctx_len": ctx_len, "n_seq": n_seq, "batch_size": int(batch_size),
                "buffer_size": int(buffer_size), "shard_width": width, "n_shards": math.ceil(d_sae / width),
                "d_sae": d_sae, "value_dtype": str(value_dtype).removeprefix("torch."),
                "tokens_digest": _digest_tensors([tokens]),
                "encoder": {k: v for k, v in encoder.describe().items() if k != "source"},  # weights: encoder_digest
                "encoder_digest": _digest_tensors([t for t in getattr(encoder, "state_dict", dict)().values()
                                                   if isinstance(t, torch.Tensor)]),
                "model": _model_id(model)}
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    group = ranks(dev)
    n_batches = math.ceil(n_seq / batch_size)
    if (out / INDEX).is_file() and _finished(out, settings):  # done earlier, by one process or several
        return LatentCache(out)
    run = dict(model=model, encoder=encoder, tokens=tokens, tokenizer=tokenizer, site=site, batch_size=batch_size,
               buffer_size=buffer_size, value_dtype=value_dtype, resume=resume, overwrite=overwrite)
    if not group.distributed:
        _cache_block(out, settings, range(n_batches), progress=progress, **run)
        return LatentCache(out)
    # Data-parallel: each rank caches a contiguous block of the batches, rank 0 links the blocks together.
    block = group.block(n_batches)
    _cache_block(rank_dir(out, group.rank, group.world), {**settings, "block": [block.start, block.stop]}, block,
                 progress=progress and group.main, **run)
    barrier(group)
    if group.main:
        merge_rank_caches(out, group.world, settings, tokens, tokenizer)
    barrier(group)
    return LatentCache(out)


def _finished(out: Path, settings: dict[str, Any]) -> bool:
    try:
        index = read_latent_index(Root(out, LatentCacheError))
    except LatentCacheError:
        return False
    return bool(index.get("done")) and {k: index.get(k) for k in settings} == json.loads(json.dumps(settings))


def _cache_block(out: Path, settings: dict[str, Any], batches: range, *, model: nn.Module, encoder: LatentEncoder,
                 tokens: torch.Tensor, tokenizer: Any, site: str, batch_size: int, buffer_size: int,
                 value_dtype: torch.dtype, resume: bool, overwrite: bool, progress: bool) -> None:
    """Cache ``batches`` of ``tokens`` into ``out`` (the whole run, or one rank's block), resumably."""
    from intervene.hooks import HookSet, add_input_hook, add_output_hook
    from intervene.sites import resolve_site

    n_seq, ctx_len = tokens.shape
    d_sae = int(settings["d_sae"])
    whole = batches.start == 0 and batches.stop == math.ceil(n_seq / batch_size)
    out.mkdir(parents=True, exist_ok=True)
    # One writer per cache (the kernel releases the lock if the process dies); then what a killed
    # run left half-written can be removed.
    with dir_lock(out, exclusive=True):
        _sweep(out)
        index = _start(out, settings, resume, overwrite, first_batch=batches.start)
        index["encoder_source"] = encoder.describe().get("source")
        if index.get("done"):
            return
        if index["n_parts"] == 0 and index["next_batch"] == batches.start and whole:  # a block's merge writes them
            save_recorded(out / TOKENS, {"tokens": tokens}, index=index)
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(str(out / "tokenizer"))
        stats = _load_stats(out, index, d_sae)
        resolved = resolve_site(model, site)
        captured: dict[str, torch.Tensor] = {}

        def grab(h: torch.Tensor) -> torch.Tensor:
            captured["h"] = h
            raise _StopForward

        hooks = HookSet()
        (add_input_hook if resolved.side == "input" else add_output_hook)(hooks, resolved.module, grab, site)
        buf = _Buffer([], [], [])
        n_batches = batches.stop
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        enc_dev = _encoder_device(encoder)
        chunk = max(1, (1 << 24) // max(1, d_sae))  # token rows per dense encode: ~64 MB of float32
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches), initial=index["next_batch"] - batches.start, disable=not progress, unit="batch",
                   desc="caching latents")
        try:
            for b in range(index["next_batch"], n_batches):
                ids = tokens[b * batch_size:(b + 1) * batch_size].to(device=dev, dtype=torch.long)
                captured.clear()
                _run_model(model, ids)
                if "h" not in captured:
                    raise LatentCacheError(f"site {site!r} did not run in the model's forward")
                x = captured.pop("h").reshape(ids.numel(), -1).to(enc_dev)
                base = b * batch_size * ctx_len
                parts = [encoder.encode_sparse(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)]
                rows = torch.cat([r + i * chunk for i, (r, _, _) in enumerate(parts)]).cpu()
                lat = torch.cat([p[1] for p in parts]).cpu().to(torch.int32)  # 16 bytes an entry with positions, values
                val = torch.cat([p[2] for p in parts]).detach().cpu().to(value_dtype)
                if buf.size and buf.size + rows.numel() > buffer_size:
                    _flush(out, buf, index, stats, next_batch=b)
                buf.add(rows.to(torch.int64) + base, lat, val)
                index["peak_buffer"] = max(index["peak_buffer"], buf.size)
                if buf.size >= buffer_size:
                    _flush(out, buf, index, stats, next_batch=b + 1)
                bar.update(1)
            if buf.size or index["next_batch"] < n_batches:
                _flush(out, buf, index, stats, next_batch=n_batches)
        finally:
            hooks.remove()
            bar.close()
        if whole:  # the stats as a merge computes them, so one process and several give the same bits
            save_recorded(out / STATS, final_stats(out, index), metadata={"progress": progress_note(index["n_parts"], n_batches)},
                  index=index)
        index["done"] = True
        write_json(out / INDEX, index)


def _remove(path: Path) -> None:
    """Remove a file, a symlink (never what it points to) or a directory tree."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _sweep(out: Path) -> None:
    """Under the lock: drop the temporaries of killed writes."""
    sweep_temporaries(out, (INDEX, TOKENS, STATS))
    shards = out / "shards"
    if shards.is_dir() and not shards.is_symlink():
        for d in shards.iterdir():
            if d.is_dir() and not d.is_symlink():
                sweep_temporaries(d, ("*",))


def _check_tree(out: Path) -> None:
    """A cache we write into must not lead outside through symlinked folders (writes would follow them)."""
    shards = out / "shards"
    if shards.is_symlink() or (shards.exists() and not shards.is_dir()):
        raise LatentCacheError.at(shards, None, "a real folder of the cache", note="a symlink or file is refused")
    for d in shards.iterdir() if shards.is_dir() else ():
        if d.is_symlink():
            raise LatentCacheError.at(d, None, "a real folder of the cache", note="a symlink is refused")


def _start(out: Path, settings: dict[str, Any], resume: bool, overwrite: bool, first_batch: int = 0
           ) -> dict[str, Any]:
    path = out / INDEX
    if path.exists() or path.is_symlink():
        try:
            index: dict[str, Any] | None = read_latent_index(Root(out, LatentCacheError))
        except LatentCacheError:
            if not overwrite:
                raise
            index = None
        same = index is not None and index["version"] == VERSION and \
            {k: index.get(k) for k in settings} == json.loads(json.dumps(settings))
        if index is not None and same and resume:
            _check_tree(out)
            _drop_stale_parts(out, index)
            return index
        if not overwrite:
            why = "different settings" if not same else "resume=False"
            raise LatentCacheError(f"{out} already holds a latent cache ({why}); use another directory or "
                                   "overwrite=True", path=path)
        for name in (INDEX, TOKENS, STATS, "shards", "tokenizer"):
            _remove(out / name)
    out.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "version": VERSION, **settings, "next_batch": first_batch, "n_parts": 0,
             "peak_buffer": 0, "done": False, "files": {}}
    write_json(path, index)
    return index


def _drop_stale_parts(out: Path, index: dict[str, Any]) -> None:
    # A crash between writing a flush's parts and its index leaves parts the index does not
    # record; the resumed run rewrites them (with the same content), so remove them first.
    recorded = set(index["files"])
    for f in (out / "shards").glob("*/*.safetensors"):
        if re.fullmatch(r"[0-9]{6}\.safetensors", f.name) and "/".join(f.parts[-3:]) not in recorded \
                and (f.is_file() or f.is_symlink()):
            f.unlink()


def _load_stats(out: Path, index: dict[str, Any], d_sae: int) -> dict[str, torch.Tensor]:
    from intervene.tensorfile import load_tensors

    rec = index["files"].get(STATS)
    if rec is not None and (out / STATS).exists():
        root = Root(out, LatentCacheError)
        t, meta, sha = load_tensors(root, STATS, digest=True)
        if sha == rec["sha256"]:  # the stats this index recorded: they must agree on the progress
            progress = progress_note(index["n_parts"], index["next_batch"])
            if meta.get("progress") != progress or set(t) != {"count", "max", "sum"} \
                    or any(v.shape != (d_sae,) for v in t.values()):
                raise LatentCacheError.at(out / INDEX, "next_batch", f"the progress its checksummed stats record "
                                          f"({meta.get('progress')})", progress,
                                          note="the resume state is inconsistent; pass overwrite=True to start over")
            return t
        # else: a run stopped between writing the stats and the index: rebuild them from the parts
    stats = {"count": torch.zeros(d_sae, dtype=torch.int64), "max": torch.full((d_sae,), -math.inf),
             "sum": torch.zeros(d_sae, dtype=torch.float64)}
    if index["n_parts"]:  # stats of an interrupted flush: rebuild them from the parts on disk
        cache = LatentCache(out, check_done=False)
        for s in range(index["n_shards"]):
            for lo, p, v in cache._shard_entries(s):
                _accumulate(stats, lo + p, v)
    return stats


def _accumulate(stats: dict[str, torch.Tensor], lat: torch.Tensor, val: torch.Tensor) -> None:
    n = stats["count"].numel()
    stats["count"] += torch.bincount(lat, minlength=n)
    stats["sum"] += torch.bincount(lat, weights=val.double(), minlength=n)
    stats["max"] = torch.maximum(stats["max"], torch.full((n,), -math.inf).scatter_reduce(0, lat, val.float(), "amax"))


def _flush(out: Path, buf: _Buffer, index: dict[str, Any], stats: dict[str, torch.Tensor], next_batch: int) -> None:
    part = index["n_parts"]
    if buf.size:
        pos, lat, val = torch.cat(buf.positions), torch.cat(buf.latents).long(), torch.cat(buf.values)
        lat, order = torch.sort(lat, stable=True)  # stable: positions stay ascending within a latent
        pos, val = pos[order], val[order]
        width = index["shard_width"]
        for s in range(index["n_shards"]):
            lo, hi = s * width, min((s + 1) * width, index["d_sae"])
            a, b = torch.searchsorted(lat, torch.tensor([lo, hi])).tolist()
            if a == b:
                continue
            local = lat[a:b] - lo
            offsets = torch.zeros(hi - lo + 1, dtype=torch.int64)
            offsets[1:] = torch.bincount(local, minlength=hi - lo).cumsum(0)
            save_recorded(out / "shards" / f"{s:05d}" / f"{part:06d}.safetensors",
                  {"positions": pos[a:b].contiguous(), "values": val[a:b].contiguous(), "offsets": offsets},
                  index=index)
        _accumulate(stats, lat, val)
    index["n_parts"] = part + 1
    index["next_batch"] = next_batch
    save_recorded(out / STATS, stats, metadata={"progress": progress_note(index["n_parts"], next_batch)}, index=index)
    write_json(out / INDEX, index)
    buf.positions.clear()
    buf.latents.clear()
    buf.values.clear()
    buf.size = 0
