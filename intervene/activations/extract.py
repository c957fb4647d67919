"""``collect``: batched activation extraction through forward hooks, optionally streamed to disk.

One forward per batch gathers every requested site (our own hooks, registered through
:mod:`intervene.hooks` and removed in ``finally``; never ``output_hidden_states``). Once the last
requested site has run, the forward is cut short, so collecting early layers skips the rest of
the model and the LM head. With ``cache_dir`` each batch is streamed into safetensors shards (see
:mod:`intervene.activations.cache`), so memory stays O(batch) and an interrupted run resumes.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from intervene.activations.cache import (
    INDEX_NAME,
    LENGTHS_KEY,
    ShardReader,
    ShardWriter,
    cache_key,
    merge_rank_caches,
    rank_dir,
    read_index,
)
from intervene.activations.distributed import barrier, gather_objects, ranks
from intervene.activations.store import Activations
from intervene.activations.tokens import (
    Batch,
    CollectPositions,
    PositionSpec,
    SpanSpec,
    encode,
    make_batch,
    select,
)
from intervene.errors import ActivationCacheError, SiteError
from intervene.hooks import HookSet, add_input_hook, add_output_hook, count_hooks
from intervene.sites import Site, block_path, num_layers, resolve_sites

DEFAULT_SHARD_BYTES = 64 * 2**20
_DIGEST_SAMPLES = 4096  # values sampled per weight tensor for the cache key


class _StopForward(Exception):
    """Raised by our last hook to skip the rest of the forward (never escapes collect)."""


# ---- inputs -----------------------------------------------------------------------------------
def _rows_and_texts(data: Any, text_field: str) -> tuple[list[str], list[Mapping] | None]:
    if isinstance(data, str):
        return [data], None
    items = list(data)  # lists, tuples, HF datasets (iterate as dicts)
    if all(isinstance(x, str) for x in items):
        return items, None
    if all(isinstance(x, Mapping) for x in items):
        missing = [i for i, r in enumerate(items) if text_field not in r]
        if missing:
            raise KeyError(f"row {missing[0]} has no {text_field!r} field (set text_field=)")
        return [str(r[text_field]) for r in items], items
    raise TypeError("collect takes a list of strings or a dataset of rows (mappings with a text field)")


def _labels_and_meta(rows: list[Mapping] | None, text_field: str) -> tuple[torch.Tensor | None, dict[str, list]]:
    if not rows:
        return None, {}
    scalar = (str, int, float, bool, type(None))
    keys = [k for k in rows[0] if k != text_field and all(isinstance(r.get(k, None), scalar) for r in rows)
            and all(k in r for r in rows)]
    meta = {k: [r[k] for r in rows] for k in keys}
    labels = None
    if "label" in meta and all(isinstance(v, (int, bool)) for v in meta["label"]):
        labels = torch.tensor([int(v) for v in meta["label"]], dtype=torch.int64)
    return labels, meta


# ---- model bookkeeping ------------------------------------------------------------------------
def _input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embedding's device, or accelerate's execution device when offloaded."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    for mod in (emb, model):
        dev = getattr(getattr(mod, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            return torch.device(dev)
    return torch.device("cpu")


def _real_tensor(model: nn.Module, name: str, p: torch.Tensor) -> torch.Tensor | None:
    """``p``, or its offloaded copy (accelerate keeps a weights map on the owning module's hook)."""
    if p.device.type != "meta":
        return p
    mod_path, _, short = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_path) if mod_path else model
    except AttributeError:
        return None
    weights_map = getattr(getattr(mod, "_hf_hook", None), "weights_map", None)
    try:
        return weights_map[short] if weights_map is not None else None
    except (KeyError, TypeError):
        return None


def weight_digest(model: nn.Module) -> str:
    """A cheap hash of the first and last blocks' weights (strided samples): tells same-config models apart."""
    import hashlib

    h = hashlib.sha256()
    try:
        paths = [block_path(model, 0)[0], block_path(model, num_layers(model) - 1)[0]]
        named = [(n, p) for n, p in model.named_parameters() if any(n.startswith(b + ".") for b in paths)]
    except Exception:  # unknown family: the first few parameters will do
        named = list(model.named_parameters())[:8]
    for name, p in named:
        h.update(f"{name}:{tuple(p.shape)}:".encode())
        t = _real_tensor(model, name, p)
        if t is None:
            h.update(b"meta")
            continue
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _DIGEST_SAMPLES)][:_DIGEST_SAMPLES]
        h.update(sample.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _run_batch(model: nn.Module, inputs: dict[str, Any]) -> None:
    """One forward; a module-level function so tests can interrupt a run between batches."""
    try:
        model(**inputs)
    except _StopForward:
        pass


# ---- the collector ----------------------------------------------------------------------------
class _Capture:
    """Hooks that copy the requested positions of each site out of the current batch."""

    def __init__(self, sites: list[Site], spec: PositionSpec, dtype: torch.dtype, stop_early: bool) -> None:
        self.sites, self.spec, self.dtype, self.stop_early = sites, spec, dtype, stop_early
        self.batch: Batch | None = None
        self.out: dict[str, torch.Tensor] = {}

    def fn(self, site: Site) -> Callable[[torch.Tensor], torch.Tensor]:
        def capture(x: torch.Tensor) -> torch.Tensor:
            if self.batch is None:  # a forward that is not ours (e.g. the user's, from another thread)
                return x
            if site.name in self.out:
                raise SiteError(f"site {site.name!r} ({site.module_path}) ran twice in one forward; "
                                "collect needs each site to run once per forward")
            y = select(x, self.batch, self.spec).to(device="cpu", dtype=self.dtype)
            if site.heads is not None:
                y = y.reshape(*y.shape[:-1], *site.heads)
            self.out[site.name] = y.contiguous()
            if self.stop_early and len(self.out) == len(self.sites):
                raise _StopForward
            return x  # the same object: the activation is left untouched

        return capture

    def run(self, model: nn.Module, batch: Batch, device: torch.device, extra: dict[str, Any]
            ) -> dict[str, torch.Tensor]:
        self.batch, self.out = batch, {}
        try:
            _run_batch(model, {**{k: v.to(device) for k, v in batch.inputs.items()}, **extra})
        finally:
            self.batch = None
        missing = [s.name for s in self.sites if s.name not in self.out]
        if missing:
            raise SiteError(f"sites {missing} did not run in the model's forward")
        return self.out


@torch.no_grad()
def collect(
    model: nn.Module,
    tok: Any,
    texts_or_dataset: Sequence[str] | Sequence[Mapping] | Any,
    sites: str | Sequence[str],
    positions: CollectPositions = "last",
    batch_size: int = 16,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    span: SpanSpec = None,
    progress: bool = True,
    *,
    text_field: str = "text",
    padding_side: str | None = None,
    max_length: int | None = None,
    stop_early: bool = True,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Activations:
    """Run ``model`` over texts and return the activations at ``sites`` and ``positions``.

    Args:
        model: a HuggingFace model (any device / dtype / accelerate ``device_map``, incl. offload).
        tok: its tokenizer (a fast one when ``span`` is used).
        texts_or_dataset: a list of strings, or rows (mappings with ``text_field``; e.g. quirky rows or a
            HF ``Dataset``): their integer ``label`` becomes ``acts.labels`` ``[N]``, scalar fields ``acts.meta``.
        sites: names or wildcards (``layers.*``, ``layers.3.heads``, a module path); see :mod:`intervene.sites`.
        positions: ``"last"`` (last real token) or an int: ``[N, D]``; a list of ``k`` ints: ``[N, k, D]``
            (indices into each text's own tokens, negative from the end); ``"mean"``: ``[N, D]``, the mean
            over ``span`` (all tokens if ``None``); ``"all"``: flat ``[total_tokens, D]`` with ``acts.offsets``.
            Heads sites give ``[..., n_heads, head_dim]`` in place of ``D``.
        batch_size: examples per forward. Padding follows ``padding_side`` (default: the tokenizer's);
            position ids count real tokens only, so left padding does not shift absolute positions.
        cache_dir: stream to safetensors shards under ``cache_dir/acts-<key>``; the key hashes the model
            (fingerprint + sampled weights + hook count), token ids, sites, positions, padding and dtype.
            A finished cache is returned without running the model; an interrupted one resumes.
        dtype: dtype of the returned activations.
        span: for ``positions="mean"``: per text ``(start_char, end_char)``, a row field holding it, or a
            callable ``row -> (start, end)``; averages the tokens that overlap the span.
        progress: show a tqdm bar.
        stop_early: end each forward once every site has run (skips later layers and the LM head).
        shard_bytes: approximate shard size of the cache (memory holds about one shard).

    The model is run as is (eval mode is the caller's job; a model in training mode gets a warning).
    The cache cannot see what other forward hooks on the model do beyond their number.
    """
    spec = PositionSpec.parse(positions)
    resolved = resolve_sites(model, list(sites) if not isinstance(sites, str) else sites)
    if not resolved:
        raise SiteError("no sites to collect")
    texts, rows = _rows_and_texts(texts_or_dataset, text_field)
    if not texts:
        raise ValueError("collect needs at least one text")
    labels, meta = _labels_and_meta(rows, text_field)
    if getattr(model, "training", False):
        warnings.warn("collect: the model is in training mode (dropout is active); call model.eval()",
                      stacklevel=2)
    side = padding_side or getattr(tok, "padding_side", None) or "right"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    enc = encode(tok, texts, spec, rows, span, max_length)
    n = len(texts)
    names = [s.name for s in resolved]
    common = dict(sites=names, n=n, positions=spec.name, labels=labels, meta=meta)

    group = ranks(_input_device(model))
    starts = list(range(0, n, batch_size))
    mine = [starts[b] for b in group.block(len(starts))]  # this process's batches (all of them, alone)
    first_row = mine[0] if mine else n
    my_rows = (min(n, mine[-1] + batch_size) - first_row) if mine else 0
    writer = None
    root = None
    if cache_dir is not None:
        from intervene.diff_format import fingerprint

        parts = {"fingerprint": fingerprint(model), "weights": weight_digest(model), "hooks": count_hooks(model),
                 "data": enc.digest(), "sites": [(s.name, s.module_path, s.side) for s in resolved],
                 "positions": spec.name, "dtype": str(dtype), "padding_side": side}
        key = cache_key(parts)
        root = Path(cache_dir) / f"acts-{key[:24]}"
        header = {"key": key, "n": n, "sites": names, "positions": spec.name,
                  "dtype": str(dtype).removeprefix("torch."), "shapes": {}, "model": parts["fingerprint"]}
        if _complete(root, key):  # finished earlier (by one process or several)
            return Activations(reader=ShardReader(root), **common)
        if group.distributed:  # each rank caches its block; rank 0 links the blocks into root at the end
            writer = ShardWriter(rank_dir(root, group.rank, group.world), {**header, "n": my_rows}, shard_bytes)
        else:
            writer = ShardWriter(root, header, shard_bytes)

    pad_id = getattr(tok, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tok, "eos_token_id", None) or 0
    device = _input_device(model)
    with_pos = _accepts(model, "position_ids")
    extra = {"use_cache": False} if _accepts(model, "use_cache") else {}  # no KV cache to build
    capture = _Capture(resolved, spec, dtype, stop_early)
    done = writer.done_rows if writer is not None else 0  # rows of this process's block already cached
    todo = [lo for lo in mine if lo >= first_row + done]
    chunks: dict[str, list[torch.Tensor]] = {s: [] for s in names}
    lengths: list[torch.Tensor] = []
    hooks = HookSet()
    bar = _progress(my_rows, done, progress and group.main)
    ok = False
    try:
        for s in resolved:
            add = add_input_hook if s.side == "input" else add_output_hook
            add(hooks, s.module, capture.fn(s), s.name)
        for lo in todo:
            batch = make_batch(enc, range(lo, min(n, lo + batch_size)), spec, pad_id, side, with_pos)
            out = capture.run(model, batch, device, extra)
            if writer is not None:
                if spec.kind == "all":
                    out = {**out, LENGTHS_KEY: batch.lengths.clone()}
                if not writer.index["shapes"]:
                    writer.index["shapes"] = {k: list(v.shape[1:]) for k, v in out.items()}
                writer.add(out, batch.size)
            else:
                for k in names:
                    chunks[k].append(out[k])
                lengths.append(batch.lengths)
            bar.update(batch.size)
        ok = True
    finally:
        hooks.remove()
        bar.close()
        if writer is not None:
            writer.close(complete=ok)
    if writer is not None:
        if group.distributed:
            barrier(group)
            if group.main:
                merge_rank_caches(root, group.world, header)  # type: ignore[arg-type]
            barrier(group)
        return Activations(reader=ShardReader(writer.root if not group.distributed else root), **common)
    if group.distributed:  # every rank gets every row, in order: what follows (fitting probes) runs anywhere
        blocks = gather_objects(group, (chunks, lengths))
        chunks = {k: [t for c, _ in blocks for t in c[k]] for k in names}
        lengths = [t for _, ls in blocks for t in ls]
    tensors = {k: torch.cat(v) if v else torch.empty(0) for k, v in chunks.items()}
    lens = torch.cat(lengths) if (lengths and spec.kind == "all") else None
    return Activations(tensors, lengths=lens, **common)


def _complete(root: Path, key: str) -> bool:
    """Whether ``root`` holds a finished cache of ``key`` (its index says so; the reader checks the rest)."""
    if not (root / INDEX_NAME).is_file():
        return False
    try:
        index = read_index(root)
    except ActivationCacheError:
        return False  # a broken index is rewritten by the writer, which refuses what it cannot trust
    return bool(index.get("complete")) and index.get("key") == key


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="collect", unit="ex", leave=False)


def collect_pairs(model: nn.Module, tok: Any, pairs: Any, sites: str | Sequence[str],
                  positions: CollectPositions = "last", span: SpanSpec = None, **kwargs: Any
                  ) -> tuple[Activations, Activations]:
    """:func:`collect` on both sides of :class:`~intervene.data.contrast.ContrastPairs`.

    Returns ``(acts_pos, acts_neg)``, each labelled with the pairs' labels and carrying their
    metadata. ``span="answer"`` with ``positions="mean"`` averages over each side's answer tokens.
    """
    out = []
    for texts, spans in ((pairs.x_pos_texts, pairs.pos_spans), (pairs.x_neg_texts, pairs.neg_spans)):
        side_span = spans if span == "answer" else span
        acts = collect(model, tok, list(texts), sites, positions=positions, span=side_span, **kwargs)
        acts.labels = torch.as_tensor(pairs.labels, dtype=torch.int64)
        acts.meta = dict(pairs.meta)
        out.append(acts)
    return out[0], out[1]
